"""lmms-eval's legacy plugin table (``LMMS_EVAL_PLUGINS``): model name -> class in ``models/<name>.py``."""

AVAILABLE_MODELS = {"movekd": "MoveKD"}
