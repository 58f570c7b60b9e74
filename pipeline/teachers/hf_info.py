"""Metadata of the Hugging Face teacher families, from a model config alone (no weights).

Each ``*_info(spec, config)`` is the one place a family's preprocessing, tapped layer, token grid
and channels are derived: the builders in ``pipeline.teachers.hf``/``clip`` use it with the
loaded model's config, the describers (``describe_teacher``, ``movekd extract --dry-run``) with a
config read by ``hf_config``. ``KNOWN_CONFIGS`` holds the few config fields of each family's
released default checkpoint, so a shipped preset describes without the hub.
"""

from __future__ import annotations

import json
import math
import os
import types

from cache.manifest import PreprocessSpec
from pipeline.teachers.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherSpec,
    clip_style_preprocess,
    square_grid,
    with_source,
)
from pipeline.teachers.registry import TeacherInfo, make_info, register_info, split_family

DEFAULT_SOURCES = {
    "sam": "facebook/sam-vit-large",
    "dinov2": "facebook/dinov2-large",
    "siglip": "google/siglip-so400m-patch14-384",
    "pix2struct": "google/pix2struct-large",
}
# The fields the describers read, from each default checkpoint's config.json (vision part).
KNOWN_CONFIGS = {
    "facebook/sam-vit-large": dict(image_size=1024, patch_size=16, output_channels=256, hidden_size=1024),
    "facebook/dinov2-large": dict(image_size=518, patch_size=14, hidden_size=1024),
    "google/siglip-so400m-patch14-384": dict(image_size=384, patch_size=14, hidden_size=1152),
    "google/pix2struct-large": dict(hidden_size=1536, patch_embed_hidden_size=768),
}
_PIL_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "area"}


def hf_config(spec: TeacherSpec, known: dict[str, dict] | None = None):
    """The (vision) config of ``spec.source`` with ``model_kwargs`` applied, without weights: a
    local directory or the HF cache via ``AutoConfig``, else the family's known default."""
    known = {**KNOWN_CONFIGS, **(known or {})}
    if spec.source in known and not os.path.isdir(spec.source):
        return types.SimpleNamespace(**{**known[spec.source], **spec.model_kwargs})
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(spec.source, **spec.model_kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"teacher {spec.name}: cannot read the model config of {spec.source!r}: {e}") from e
    return getattr(cfg, "vision_config", cfg)


def square_grid_from_config(resolution: int, cfg, what: str) -> tuple[int, int]:
    patch = getattr(cfg, "patch_size", None)
    if patch is None:
        raise ValueError(f"teacher {what}: the model config has no patch_size; cannot derive a token grid")
    return square_grid(resolution, patch, f"teacher {what}")


def config_image_size(cfg) -> int | None:
    size = getattr(cfg, "image_size", None)
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size is not None else None


def processor_stats(source: str) -> tuple[tuple, tuple, str]:
    """mean/std/interpolation from a local ``preprocessor_config.json``; ImageNet/bicubic otherwise."""
    path = os.path.join(source, "preprocessor_config.json")
    if not os.path.isfile(path):
        return IMAGENET_MEAN, IMAGENET_STD, "bicubic"
    with open(path) as f:
        cfg = json.load(f)
    interpolation = _PIL_RESAMPLE_NAMES.get(cfg.get("resample", 3), "bicubic")
    return tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD)), interpolation


def hidden_state_layer(layer: int | None) -> str:
    where = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"
    return f"{where} patch tokens (prefix tokens dropped)"


def _hidden_state_info(spec: TeacherSpec, cfg, pre: PreprocessSpec, layer: int | None) -> TeacherInfo:
    grid = square_grid_from_config(pre.resolution, cfg, spec.name)
    return make_info(spec, pre, hidden_state_layer(layer), grid, int(cfg.hidden_size))


# -- per family ----------------------------------------------------------------------------------
def dinov2_info(spec: TeacherSpec, cfg) -> TeacherInfo:
    pre = clip_style_preprocess(spec.resolution or 224, spec.aspect, IMAGENET_MEAN, IMAGENET_STD)
    return _hidden_state_info(spec, cfg, pre, spec.layer)


def siglip_layer(spec: TeacherSpec) -> int:
    return -2 if spec.layer is None else spec.layer


def siglip_info(spec: TeacherSpec, cfg) -> TeacherInfo:
    resolution = spec.resolution or config_image_size(cfg)
    pre = clip_style_preprocess(resolution, spec.aspect, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return _hidden_state_info(spec, cfg, pre, siglip_layer(spec))


def generic_source(spec: TeacherSpec) -> TeacherSpec:
    spec = with_source(spec, split_family(spec.family)[1])
    if not spec.source:
        raise ValueError(f"teacher {spec.name}: family 'hf' needs 'hf:<path-or-id>' or a source")
    return spec


def generic_info(spec: TeacherSpec, cfg) -> TeacherInfo:
    resolution = spec.resolution or config_image_size(cfg)
    if resolution is None:
        raise ValueError(f"teacher {spec.name}: the config has no image_size; set 'resolution'")
    mean, std, interpolation = processor_stats(spec.source)
    pre = clip_style_preprocess(resolution, spec.aspect, mean, std, interpolation)
    return _hidden_state_info(spec, cfg, pre, spec.layer)


SAM_LAYER = "vision_encoder.neck output (channels-last, row-major)"


def sam_info(spec: TeacherSpec, cfg) -> TeacherInfo:
    if spec.layer is not None:
        raise ValueError(f"teacher {spec.name}: sam taps the neck output only; 'layer' must be unset")
    size = config_image_size(cfg)
    resolution = spec.resolution or size
    if resolution != size:
        raise ValueError(f"teacher {spec.name}: sam needs resolution == config.image_size ({size}), got {resolution}")
    pre = PreprocessSpec(
        resolution=resolution,
        resize="longest_edge",
        crop="none",
        pad="bottom_right",
        aspect=spec.aspect,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    grid = square_grid_from_config(resolution, cfg, spec.name)
    return make_info(spec, pre, SAM_LAYER, grid, int(cfg.output_channels))


def pix2struct_patch(spec: TeacherSpec, cfg) -> int:
    depth = int(cfg.patch_embed_hidden_size)
    patch = int(round(math.sqrt(depth / 3)))
    if patch * patch * 3 != depth:
        raise ValueError(f"teacher {spec.name}: patch_embed_hidden_size {depth} is not 3 * p * p")
    return patch


def pix2struct_info(spec: TeacherSpec, cfg) -> TeacherInfo:
    resolution = spec.resolution or 512
    grid = square_grid(resolution, pix2struct_patch(spec, cfg), f"teacher {spec.name}")
    pre = clip_style_preprocess(resolution, spec.aspect, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    where = "last_hidden_state" if spec.layer is None else f"hidden_states[{spec.layer}]"
    return make_info(spec, pre, f"encoder {where} (fixed {grid} patch grid)", grid, int(cfg.hidden_size))


# -- describers ----------------------------------------------------------------------------------
def _describer(family: str, info_fn):
    def describe(spec: TeacherSpec) -> TeacherInfo:
        spec = with_source(spec, DEFAULT_SOURCES[family])
        return info_fn(spec, hf_config(spec))

    register_info(family)(describe)


for _family, _fn in (
    ("dinov2", dinov2_info),
    ("siglip", siglip_info),
    ("sam", sam_info),
    ("pix2struct", pix2struct_info),
):
    _describer(_family, _fn)


@register_info("hf:")
def describe_hf_generic(spec: TeacherSpec) -> TeacherInfo:
    spec = generic_source(spec)
    return generic_info(spec, hf_config(spec))
