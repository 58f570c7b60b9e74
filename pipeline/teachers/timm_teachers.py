"""timm teachers: eva (EVA-02), convnext (ConvNeXt-XXL) and generic ``timm:<model_name>``.

Decisions:
- Features come from ``forward_intermediates(indices, norm=False, output_fmt="NCHW",
  intermediates_only=True, stop_early=True)``: the block/stage output with no final norm, prefix
  (CLS/register) tokens dropped and the patch grid restored by timm, flattened row-major here.
  ``layer`` None = the last block/stage; an int picks that block/stage (negative from the end).
- Loading, by ``source``: an existing file (``.safetensors`` or a ``.pth`` state dict) goes through
  timm's own pretrained loader, ``create_model(arch, pretrained=True,
  pretrained_cfg_overlay=dict(file=..., num_classes=n), num_classes=n)`` with ``n`` the
  architecture's pretrained class count (or ``model_kwargs["num_classes"]``): the checkpoint filter
  (pos-embed / patch-embed resampling, key remapping) runs and, because the class counts agree, the
  load is strict, so a wrong or partial checkpoint fails instead of leaving random weights. Any
  other non-empty source is a Hugging Face hub id (``create_model("hf-hub:" + source)``); an empty
  source means timm's default pretrained weights for the architecture.
- eva: timm's EVA-02-L with its MIM (Merged-38M) weights, built with ``img_size=resolution`` and
  ``patch_size=16`` (timm resamples the 14 px patch embedding to 16 px on load). NOT the released
  teacher: that is the EVA-02-L ViTDet backbone (windowed attention, detection fine-tune), family
  ``eva_vitdet`` (``eva_vitdet_teacher.py``), which the v1.0/v1.1 presets use; a cache made with
  this family is not the released v1.0. CLIP mean/std, shortest edge 1024 + centre crop.
- convnext: ``convnext_xxlarge`` stage-4 output, no norm, 32x32x3072 at 1024 px. The released code
  asks timm for ``convnext_xxlarge`` whose default tag is the in1k fine-tune of the LAION-2B soup.
- timm generic: mean/std/interpolation from the model's pretrained config, resolution from it
  unless set (a ViT with a fixed ``img_size`` needs ``model_kwargs["img_size"]`` to change it).
"""

from __future__ import annotations

import functools
import os

import torch

from pipeline.teachers.base import NativeOutput, Teacher, TeacherSpec, clip_style_preprocess, with_source
from pipeline.teachers.registry import TeacherInfo, make_info, register_info, register_teacher, split_family

EVA_ARCH, EVA_SOURCE = "eva02_large_patch14_224", "timm/eva02_large_patch14_224.mim_m38m"
CONVNEXT_ARCH, CONVNEXT_SOURCE = "convnext_xxlarge", "timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def timm_layer(spec: TeacherSpec) -> str:
    where = "last block/stage" if spec.layer is None else f"block/stage {spec.layer}"
    return f"forward_intermediates: {where} output, no norm, prefix tokens dropped"


def timm_features(model: torch.nn.Module, pixels: torch.Tensor, block: int | None) -> torch.Tensor:
    """[B, C, H, W]: the block/stage output, no final norm, prefix tokens dropped (timm)."""
    indices = 1 if block is None else [block]
    return model.forward_intermediates(
        pixels, indices=indices, norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True
    )[0]


class TimmTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, model, device, preprocess, arch_info: dict):
        self.block = spec.layer
        super().__init__(spec, model, device, preprocess, layer=timm_layer(spec), arch_info=arch_info)

    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        feats = timm_features(self.model, pixels, self.block)
        return NativeOutput(tokens=feats.flatten(2).transpose(1, 2), grid=tuple(feats.shape[-2:]))


def load_timm(arch: str | None, spec: TeacherSpec, kwargs: dict) -> torch.nn.Module:
    """Create a timm model with pretrained weights from ``spec.source`` (see module docstring)."""
    import timm

    source = spec.source
    try:
        if source and os.path.isfile(source):
            if not arch:
                raise ValueError(f"teacher {spec.name}: a checkpoint file needs 'arch' (the timm model name)")
            cfg = timm.models.get_pretrained_cfg(arch)
            n = kwargs.get("num_classes", cfg.num_classes if cfg is not None else 1000)
            overlay = dict(file=os.path.abspath(source), num_classes=n)
            return timm.create_model(
                arch, pretrained=True, pretrained_cfg_overlay=overlay, **{**kwargs, "num_classes": n}
            )
        if source.endswith(_CHECKPOINT_SUFFIXES) or source.startswith((".", "/")):
            raise ValueError(f"teacher {spec.name}: checkpoint file {source!r} does not exist")
        if source:
            return timm.create_model("hf-hub:" + source.removeprefix("hf-hub:"), pretrained=True, **kwargs)
        return timm.create_model(arch, pretrained=True, **kwargs)
    except RuntimeError as e:  # timm's strict load_state_dict and unknown-model errors
        raise ValueError(f"teacher {spec.name}: cannot load timm {arch or source!r} from {source!r}: {e}") from e


# -- per family: (spec with its source, timm arch, create_model kwargs, preprocessing of a model) --
def _eva(spec: TeacherSpec):
    spec = with_source(spec, EVA_SOURCE)
    resolution = spec.resolution or 1024
    kwargs = {"img_size": resolution, "patch_size": 16, **spec.model_kwargs}
    if kwargs["img_size"] != resolution:
        raise ValueError(f"teacher {spec.name}: model_kwargs img_size {kwargs['img_size']} != resolution {resolution}")
    return spec, spec.arch or EVA_ARCH, kwargs, lambda model: clip_style_preprocess(resolution, spec.aspect)


def _convnext(spec: TeacherSpec):
    spec = with_source(spec, CONVNEXT_SOURCE)
    resolution = spec.resolution or 1024
    pre = lambda model: clip_style_preprocess(resolution, spec.aspect)  # noqa: E731
    return spec, spec.arch or CONVNEXT_ARCH, dict(spec.model_kwargs), pre


def _generic(spec: TeacherSpec):
    """``timm:<model_name>``: mean/std/interpolation from the model's pretrained config."""
    arch = split_family(spec.family)[1] or spec.arch
    if not arch:
        raise ValueError(f"teacher {spec.name}: family 'timm' needs 'timm:<model_name>' or 'arch'")

    def pre(model):
        from timm.data import resolve_data_config

        data = resolve_data_config({}, model=model)
        resolution = spec.resolution or _model_img_size(model) or int(data["input_size"][-1])
        interpolation = data.get("interpolation", "bicubic")
        interpolation = interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
        return clip_style_preprocess(resolution, spec.aspect, tuple(data["mean"]), tuple(data["std"]), interpolation)

    return spec, arch, dict(spec.model_kwargs), pre


_FAMILIES = {"eva": _eva, "convnext": _convnext, "timm:": _generic}


def _build(family: str, spec: TeacherSpec, device: torch.device) -> Teacher:
    spec, arch, kwargs, pre = _FAMILIES[family](spec)
    model = load_timm(arch, spec, kwargs)
    return TimmTeacher(spec, model, device, pre(model), arch_info={"arch": arch, "model_kwargs": kwargs})


def _describe(family: str, spec: TeacherSpec) -> TeacherInfo:
    """The architecture built on the meta device (no weights, no memory), run on a meta tensor."""
    import timm

    spec, arch, kwargs, pre = _FAMILIES[family](spec)
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **kwargs)
            preprocess = pre(model)
            r = preprocess.resolution
            feats = timm_features(model, torch.empty(1, 3, r, r), spec.layer)
    except RuntimeError as e:
        raise ValueError(f"teacher {spec.name}: cannot build timm {arch!r} with {kwargs}: {e}") from e
    return make_info(spec, preprocess, timm_layer(spec), tuple(feats.shape[-2:]), int(feats.shape[1]))


for _family in _FAMILIES:
    register_teacher(_family)(functools.partial(_build, _family))
    register_info(_family)(functools.partial(_describe, _family))


def _model_img_size(model: torch.nn.Module) -> int | None:
    """A ViT's fixed input size (its pretrained cfg keeps the default even when img_size is overridden)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    return int(size[-1] if isinstance(size, (tuple, list)) else size)
