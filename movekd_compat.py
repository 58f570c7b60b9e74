"""Make ``import torchvision`` work when its compiled ops cannot load.

``ensure_torchvision_importable()`` is called ONCE per process, at the entry points, before
anything imports timm or a transformers vision model: the ``movekd`` CLI and ``python -m jobs.*``
(``jobs.cli.prepare_process``), every Ray worker process (a ``worker_process_setup_hook`` set by
the Ray extraction driver's ``init_ray``), the test suite and its child processes
(``tests/__init__.py``) and each benchmark's ``__main__``. Library modules never call it and
importing this module has no side effect, so nothing depends on import order. A script of your
own that imports timm on such a machine calls it first.
It is a top-level module because every package's entry points need it.

Why this exists: on CPU-only machines we pin the CPU build of torch 2.13, but PyPI's x86_64
torchvision 0.28 wheel is built against CUDA torch, so its ``_C`` extension fails to load. torchvision
then still registers fake kernels for ``torchvision::nms``/``qnms`` unguarded and the import dies
with "operator torchvision::nms does not exist", which takes timm (and transformers' fast image
processors) down with it. We only need torchvision's pure-Python parts (transforms,
FrozenBatchNorm2d), so when the ops are missing we define the two operator *schemas* (no kernels:
calling them still fails loudly) before torchvision is imported. Where torchvision's ops load
(every GPU install), this does nothing.

Why it cannot go (checked 2026-12-01): PyPI has no CPU build of torchvision 0.28 (its only wheel
is ``+cu130``; download.pytorch.org is not reachable from CI), 0.28 is the only release that
pairs with torch 2.13, and timm imports torchvision at ``import timm`` (``FrozenBatchNorm2d``).
transformers alone does not need torchvision, but once it is installed transformers imports it
for every vision model and image processor.
"""

from __future__ import annotations

import importlib.util

_done = False


def ensure_torchvision_importable() -> None:
    global _done
    if _done or importlib.util.find_spec("torchvision") is None:
        _done = True
        return
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in (
            "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        ):
            name = schema.split("(")[0]
            if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not hasattr(torch.ops.torchvision, name):
                lib.define(schema)
        _LIBS.append(lib)  # keep the library alive for the process lifetime
        import torchvision  # noqa: F401,F811
    _done = True


_LIBS: list = []
