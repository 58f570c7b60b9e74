"""The test suite (a package, so subprocess children run its helpers as ``python -m tests....``).

Process set-up for every test process lives here, once: on a CPU machine with PyPI's CUDA-built
torchvision, ``movekd_compat.ensure_torchvision_importable()`` must run before anything imports
timm or a transformers vision model. This package's ``__init__`` runs before any test module is
collected by pytest, and before the module of any child a test starts (``python -m
tests.helpers.train_stop``, ``python -m tests.student._trainer_fixtures``, ``torch.multiprocessing``
spawn targets), so each of those processes has it without importing it itself.
"""

from movekd_compat import ensure_torchvision_importable

ensure_torchvision_importable()
