"""lmms-eval plugin: evaluate a movekd student with the harness (model name ``movekd``).

Two ways lmms-eval finds it (install the ``eval`` extra: ``pip install -e ".[eval]"``):

- the ``lmms_eval.models`` entry point this package declares in ``pyproject.toml`` (lmms-eval >= 0.7
  reads it on start), so ``lmms-eval --model movekd`` works after installation; and
- the legacy ``LMMS_EVAL_PLUGINS=jobs.lmms_plugin`` variable, which also adds this package's
  ``tasks/`` folder to the task search path.

    lmms-eval --model movekd --model_args pretrained=RUN/export,batch_size=8 --tasks TASKS

``model_args`` are the arguments of :class:`jobs.lmms_plugin.models.movekd.MoveKD`.
"""

from __future__ import annotations


def manifest():
    """Entry-point payload: lmms-eval's model manifest for ``movekd``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="movekd", simple_class_path="jobs.lmms_plugin.models.movekd.MoveKD")
