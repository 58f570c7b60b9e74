"""Make ``import torchvision`` work when its compiled ops cannot load.

Import this module before transformers or timm (``import movekd_compat  # noqa: F401``). It is a
top-level module because both pipeline/ and student/ need it and may not import each other.

Why this exists: on CPU-only machines we pin the CPU build of torch 2.13, but PyPI's x86_64
torchvision 0.28 wheel is built against CUDA torch, so its ``_C`` extension fails to load. torchvision
then still registers fake kernels for ``torchvision::nms``/``qnms`` unguarded and the import dies
with "operator torchvision::nms does not exist", which takes timm (and transformers' fast image
processors) down with it. We only need torchvision's pure-Python parts (transforms,
FrozenBatchNorm2d), so when the ops are missing we define the two operator *schemas* (no kernels:
calling them still fails loudly) before torchvision is imported. Where torchvision's ops load
(every GPU install), this does nothing.
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
            if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not hasattr(
                torch.ops.torchvision, name
            ):
                lib.define(schema)
        _LIBS.append(lib)  # keep the library alive for the process lifetime
        import torchvision  # noqa: F401,F811
    _done = True


_LIBS: list = []

ensure_torchvision_importable()
