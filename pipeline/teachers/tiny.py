"""Tiny random-weight teachers of every family, saved through the real savers.

``make_tiny_teachers(out_dir)`` builds each family's real architecture at toy size (hidden 32-48,
2-3 layers, 32-128 px inputs), seeds it, perturbs every parameter with N(0, 0.02) noise (some HF
configs initialise near zero, e.g. SAM's ``initializer_range=1e-10``, which would make every token
equal and a token-order test vacuous), saves it, and returns the ``TeacherSpec``s that load it back
through ``build_teacher``. Used by the tests, the ``tiny`` extraction config and the demo.
Keys are family-like names: ``eva`` is the released teacher's architecture (family ``eva_vitdet``,
named ``eva`` as in the presets); ``eva_timm`` is timm's EVA-02 (family ``eva``).

Decisions:
- HF models are saved with ``save_pretrained`` as the vision class the loader uses (quiet loads);
  the tests cover the full-checkpoint layouts (CLIPModel, SamModel, Pix2Struct image-to-text)
  separately. timm models are saved as a ``.safetensors`` state dict, which timm's pretrained
  loader reads through ``pretrained_cfg_overlay=dict(file=...)``.
- Deterministic: each family uses its own seed inside ``torch.random.fork_rng``, so the weights do
  not depend on which other families were built, and the caller's RNG state is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from pipeline.teachers.base import TeacherSpec

TINY_FAMILIES = ("clip", "eva", "convnext", "sam", "pix2struct", "dinov2", "siglip", "hf", "timm", "eva_timm")
_TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def make_tiny_teachers(
    out_dir: str | os.PathLike, families: Iterable[str] | None = None, seed: int = 0
) -> list[TeacherSpec]:
    """Write tiny checkpoints for ``families`` (default: all) under ``out_dir``; return their specs."""
    families = list(TINY_FAMILIES if families is None else families)
    unknown = [f for f in families if f not in _MAKERS]
    if unknown:
        raise ValueError(
            f"no tiny teacher for famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
            f"available: {list(TINY_FAMILIES)}"
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    specs = []
    for family in families:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + TINY_FAMILIES.index(family))
            specs.append(_MAKERS[family](out_dir))
    return specs


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _save_hf(model, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    _perturb(model).save_pretrained(path)
    return path


def _save_timm(model, out_dir: str, name: str) -> str:
    from safetensors.torch import save_file

    path = os.path.join(out_dir, f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in _perturb(model).state_dict().items()}, path)
    return path


def _clip(out_dir: str) -> TeacherSpec:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**{**_TINY_VIT, "num_hidden_layers": 3}, image_size=56, patch_size=14)
    return TeacherSpec(name="clip", family="clip", source=_save_hf(CLIPVisionModel(cfg), out_dir, "clip"))


def _sam(out_dir: str) -> TeacherSpec:
    from transformers import SamVisionConfig, SamVisionModel

    cfg = SamVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
        output_channels=32,  # 32 ch x 8 rows = 16^2: the released SAM layout applies (student/adapters.py)
        window_size=4,
        global_attn_indexes=[1],
        mlp_dim=64,
        initializer_range=0.02,
    )
    return TeacherSpec(name="sam", family="sam", source=_save_hf(SamVisionModel(cfg), out_dir, "sam"))


def _pix2struct(out_dir: str) -> TeacherSpec:
    from transformers import Pix2StructVisionConfig, Pix2StructVisionModel

    cfg = Pix2StructVisionConfig(
        hidden_size=32,
        patch_embed_hidden_size=8 * 8 * 3,
        d_ff=64,
        d_kv=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        initializer_range=0.02,
    )
    path = _save_hf(Pix2StructVisionModel(cfg), out_dir, "pix2struct")
    return TeacherSpec(name="pix2struct", family="pix2struct", source=path, resolution=64)


def _dinov2(out_dir: str) -> TeacherSpec:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    )
    path = _save_hf(Dinov2Model(cfg), out_dir, "dinov2")
    return TeacherSpec(name="dinov2", family="dinov2", source=path, resolution=48)


def _siglip(out_dir: str) -> TeacherSpec:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**_TINY_VIT, image_size=32, patch_size=8)
    return TeacherSpec(name="siglip", family="siglip", source=_save_hf(SiglipVisionModel(cfg), out_dir, "siglip"))


def _hf_generic(out_dir: str) -> TeacherSpec:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig(**_TINY_VIT, image_size=32, patch_size=8)
    path = _save_hf(ViTModel(cfg), out_dir, "hf_vit")
    ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return TeacherSpec(name="hf_vit", family="hf", source=path)


def _eva(out_dir: str) -> TeacherSpec:
    """The released ``eva`` teacher's architecture (EVA-02 ViTDet: windows, global blocks, RoPE,
    SwiGLU), saved with the released key names (``backbone.net.`` prefix) as safetensors."""
    from safetensors.torch import save_file

    from pipeline.teachers.eva_vitdet import EvaViTDet, EvaViTDetConfig

    kwargs = dict(
        patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4, global_blocks=[1], pretrain_img_size=32
    )
    model = _perturb(EvaViTDet(EvaViTDetConfig(img_size=64, **kwargs)))
    path = os.path.join(out_dir, "eva_vitdet.safetensors")
    save_file({"backbone.net." + k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return TeacherSpec(name="eva", family="eva_vitdet", source=path, resolution=64, model_kwargs=kwargs)


def _eva_timm(out_dir: str) -> TeacherSpec:
    """timm's EVA-02 (family ``eva``): not the released teacher, kept under its own name."""
    import timm

    kwargs = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
    model = timm.create_model("eva02_large_patch14_224", pretrained=False, img_size=64, **kwargs)
    return TeacherSpec(
        name="eva_timm",
        family="eva",
        source=_save_timm(model, out_dir, "eva_timm"),
        arch="eva02_large_patch14_224",
        resolution=64,
        model_kwargs=kwargs,
    )


def _convnext(out_dir: str) -> TeacherSpec:
    import timm

    kwargs = dict(depths=[1, 1, 1, 1], dims=[16, 24, 32, 48])
    model = timm.create_model("convnext_xxlarge", pretrained=False, **kwargs)
    return TeacherSpec(
        name="convnext",
        family="convnext",
        source=_save_timm(model, out_dir, "convnext"),
        arch="convnext_xxlarge",
        resolution=128,
        model_kwargs=kwargs,
    )


def _timm_generic(out_dir: str) -> TeacherSpec:
    import timm

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)
    return TeacherSpec(
        name="timm_vit",
        family="timm:vit_small_patch16_224",
        source=_save_timm(model, out_dir, "timm_vit"),
        model_kwargs=kwargs,
    )


_MAKERS: dict[str, Callable[[str], TeacherSpec]] = {
    "clip": _clip,
    "eva": _eva,
    "convnext": _convnext,
    "sam": _sam,
    "pix2struct": _pix2struct,
    "dinov2": _dinov2,
    "siglip": _siglip,
    "hf": _hf_generic,
    "timm": _timm_generic,
    "eva_timm": _eva_timm,
}
