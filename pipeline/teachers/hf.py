"""Hugging Face teachers: sam, dinov2, siglip, pix2struct and generic ``hf:<path-or-id>``.

Decisions:
- Loading: ``<Class>.from_pretrained(source, attn_implementation=..., dtype=float32,
  output_loading_info=True)``. transformers only *warns* about weights missing from a checkpoint
  and initialises them randomly, so a missing (except pooler/head weights, which feed no hidden
  state) or shape-mismatched key is a ``ValueError`` here.
  Unexpected keys are fine: vision classes load from full checkpoints (``CLIPVisionModel`` from a
  CLIPModel checkpoint, ``SamVisionModel`` from a SamModel one) and skip the other towers.
- Attention: ``flash_attention_2`` on CUDA when ``flash_attn`` imports, the class supports it and
  the compute dtype is 16-bit; else ``sdpa`` where supported; else eager.
- sam: the vision encoder incl. neck, output [B, 256, 64, 64] for the real model, flattened to
  tokens in row-major grid order (token j = (j // W, j % W)), so the cache stays spatially honest.
  The resolution must equal ``config.image_size`` (absolute position embedding of fixed size).
- pix2struct: a deterministic fixed-patch-count variant. The real processor rescales each image to
  fit ``max_patches`` with its aspect ratio (a variable grid plus padding). Here the image is
  preprocessed like CLIP to ``resolution`` (mean 0, std 1: pixels in [0, 1]) and ``encode`` applies
  Pix2Struct's own per-image standardisation (on the 0-255 scale, std floored at 1/sqrt(numel))
  and patch flattening (row/column ids from 1, patch vectors in (ph, pw, C) order), giving a full
  ``(R/p) x (R/p)`` grid: 1024 tokens at the default 512 px with 16 px patches.
- dinov2/siglip/hf: patch tokens of ``hidden_states[layer]`` (no final norm) or, for layer None,
  of ``last_hidden_state``; leading prefix tokens (CLS, registers) = total - grid size are dropped.
  Their processors' crop-from-256 (dinov2) and squash-resize (siglip) are replaced by the shared
  shortest-edge + centre-crop path, with each model's own mean/std.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os

import torch
import torch.nn.functional as F

from cache.manifest import PreprocessSpec
from pipeline.teachers.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NativeOutput,
    Teacher,
    TeacherSpec,
    clip_style_preprocess,
    register_teacher,
    split_family,
    square_grid,
    with_source,
)

DEFAULT_SOURCES = {
    "sam": "facebook/sam-vit-large",
    "dinov2": "facebook/dinov2-large",
    "siglip": "google/siglip-so400m-patch14-384",
    "pix2struct": "google/pix2struct-large",
}
_PIL_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "area"}
# Weights that only feed pooled/classifier outputs, never a hidden state: a checkpoint may lack them.
_OUTPUT_ONLY_PREFIXES = ("pooler.", "head.", "vision_model.head.")


# -- shared helpers ------------------------------------------------------------------------
def attn_implementation(cls: type, device: torch.device, spec: TeacherSpec) -> str:
    sixteen_bit = spec.compute_dtype in ("auto", "bfloat16", "float16")
    flash = getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False)
    if device.type == "cuda" and sixteen_bit and flash and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def load_hf(cls: type, spec: TeacherSpec, device: torch.device) -> torch.nn.Module:
    """``cls.from_pretrained`` that refuses checkpoints with missing or mismatched weights."""
    source = spec.source
    try:
        model, info = cls.from_pretrained(
            source,
            attn_implementation=attn_implementation(cls, device, spec),
            dtype=torch.float32,
            output_loading_info=True,
            **spec.model_kwargs,
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"teacher {spec.name}: cannot load {cls.__name__} from {source!r}: {e}") from e
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith(_OUTPUT_ONLY_PREFIXES))
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        raise ValueError(
            f"teacher {spec.name}: {source!r} is not a complete {cls.__name__} checkpoint: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, mismatched {mismatched[:6]}"
        )
    return model


def accepts_kwarg(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def square_grid_from_config(resolution: int, cfg, what: str) -> tuple[int, int]:
    patch = getattr(cfg, "patch_size", None)
    if patch is None:
        raise ValueError(f"teacher {what}: the model config has no patch_size; cannot derive a token grid")
    return square_grid(resolution, patch, f"teacher {what}")


def _config_image_size(cfg) -> int | None:
    size = getattr(cfg, "image_size", None)
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size is not None else None


# -- hidden-state teachers (dinov2, siglip, generic hf) -------------------------------------
class HFTeacher(Teacher):
    """Patch tokens of ``hidden_states[layer]`` or ``last_hidden_state`` of an HF vision model."""

    def __init__(self, spec: TeacherSpec, model, device, preprocess: PreprocessSpec, layer: int | None):
        self.hs_layer = layer
        self.patch_grid = square_grid_from_config(preprocess.resolution, model.config, spec.name)
        self.forward_kwargs = {}
        if preprocess.resolution != _config_image_size(model.config) and accepts_kwarg(
            model, "interpolate_pos_encoding"
        ):
            self.forward_kwargs["interpolate_pos_encoding"] = True
        where = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"
        super().__init__(
            spec,
            model,
            device,
            preprocess,
            layer=f"{where} patch tokens (prefix tokens dropped)",
            arch_info={"class": type(model).__name__, "model_kwargs": spec.model_kwargs},
        )

    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        out = self.model(pixel_values=pixels, output_hidden_states=self.hs_layer is not None, **self.forward_kwargs)
        hidden = out.last_hidden_state if self.hs_layer is None else out.hidden_states[self.hs_layer]
        n = self.patch_grid[0] * self.patch_grid[1]
        prefix = hidden.shape[1] - n
        if prefix < 0:
            raise ValueError(f"teacher {self.name}: {hidden.shape[1]} tokens, fewer than the {n} patches")
        return NativeOutput(tokens=hidden[:, prefix:], grid=self.patch_grid)


@register_teacher("dinov2")
def build_dinov2(spec: TeacherSpec, device: torch.device) -> Teacher:
    from transformers import Dinov2Model

    spec = with_source(spec, DEFAULT_SOURCES["dinov2"])
    model = load_hf(Dinov2Model, spec, device)
    pp = clip_style_preprocess(spec.resolution or 224, spec.aspect, IMAGENET_MEAN, IMAGENET_STD)
    return HFTeacher(spec, model, device, pp, spec.layer)


@register_teacher("siglip")
def build_siglip(spec: TeacherSpec, device: torch.device) -> Teacher:
    from transformers import SiglipVisionModel

    spec = with_source(spec, DEFAULT_SOURCES["siglip"])
    model = load_hf(SiglipVisionModel, spec, device)
    resolution = spec.resolution or _config_image_size(model.config)
    pp = clip_style_preprocess(resolution, spec.aspect, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return HFTeacher(spec, model, device, pp, -2 if spec.layer is None else spec.layer)


@register_teacher("hf:")
def build_hf_generic(spec: TeacherSpec, device: torch.device) -> Teacher:
    """``hf:<path-or-id>`` (or family ``hf`` with ``source``): any AutoModel vision backbone whose
    forward takes ``pixel_values`` and whose config has ``patch_size``."""
    from transformers import AutoModel

    spec = with_source(spec, split_family(spec.family)[1])
    if not spec.source:
        raise ValueError(f"teacher {spec.name}: family 'hf' needs 'hf:<path-or-id>' or a source")
    model = load_hf(AutoModel, spec, device)
    resolution = spec.resolution or _config_image_size(model.config)
    if resolution is None:
        raise ValueError(f"teacher {spec.name}: the config has no image_size; set 'resolution'")
    mean, std, interpolation = _processor_stats(spec.source)
    pp = clip_style_preprocess(resolution, spec.aspect, mean, std, interpolation)
    return HFTeacher(spec, model, device, pp, spec.layer)


def _processor_stats(source: str) -> tuple[tuple, tuple, str]:
    """mean/std/interpolation from a local ``preprocessor_config.json``; ImageNet/bicubic otherwise."""
    path = os.path.join(source, "preprocessor_config.json")
    if not os.path.isfile(path):
        return IMAGENET_MEAN, IMAGENET_STD, "bicubic"
    with open(path) as f:
        cfg = json.load(f)
    interpolation = _PIL_RESAMPLE_NAMES.get(cfg.get("resample", 3), "bicubic")
    return tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD)), interpolation


# -- sam -----------------------------------------------------------------------------------
class SamTeacher(Teacher):
    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        feats = self.model(pixel_values=pixels).last_hidden_state  # [B, C, H, W] neck output
        return NativeOutput(tokens=feats.flatten(2).transpose(1, 2), grid=tuple(feats.shape[-2:]))


@register_teacher("sam")
def build_sam(spec: TeacherSpec, device: torch.device) -> Teacher:
    from transformers import SamVisionModel

    if spec.layer is not None:
        raise ValueError(f"teacher {spec.name}: sam taps the neck output only; 'layer' must be unset")
    spec = with_source(spec, DEFAULT_SOURCES["sam"])
    model = load_hf(SamVisionModel, spec, device)
    size = _config_image_size(model.config)
    resolution = spec.resolution or size
    if resolution != size:
        raise ValueError(f"teacher {spec.name}: sam needs resolution == config.image_size ({size}), got {resolution}")
    pp = PreprocessSpec(
        resolution=resolution,
        resize="longest_edge",
        crop="none",
        pad="bottom_right",
        aspect=spec.aspect,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return SamTeacher(
        spec,
        model,
        device,
        pp,
        layer="vision_encoder.neck output (channels-last, row-major)",
        arch_info={"class": type(model).__name__, "model_kwargs": spec.model_kwargs},
    )


# -- pix2struct ----------------------------------------------------------------------------
class Pix2StructTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, model, device, resolution: int):
        depth = int(model.config.patch_embed_hidden_size)
        self.patch = int(round(math.sqrt(depth / 3)))
        if self.patch * self.patch * 3 != depth:
            raise ValueError(f"teacher {spec.name}: patch_embed_hidden_size {depth} is not 3 * p * p")
        self.patch_grid = square_grid(resolution, self.patch, f"teacher {spec.name}")
        self.hs_layer = spec.layer
        pp = clip_style_preprocess(resolution, spec.aspect, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
        where = "last_hidden_state" if spec.layer is None else f"hidden_states[{spec.layer}]"
        super().__init__(
            spec,
            model,
            device,
            pp,
            layer=f"encoder {where} (fixed {self.patch_grid} patch grid)",
            arch_info={"class": type(model).__name__, "model_kwargs": spec.model_kwargs},
        )

    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        patches = pix2struct_patches(pixels, self.patch)
        mask = torch.ones(patches.shape[:2], device=patches.device)
        out = self.model(flattened_patches=patches, attention_mask=mask, output_hidden_states=self.hs_layer is not None)
        hidden = out.last_hidden_state if self.hs_layer is None else out.hidden_states[self.hs_layer]
        return NativeOutput(tokens=hidden, grid=self.patch_grid)


def pix2struct_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, R, R] in [0, 1] -> Pix2Struct ``flattened_patches`` [B, L, 2 + p*p*3] (see docstring)."""
    x = pixels.float() * 255.0
    b, c, h, w = x.shape
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, correction=0).clamp(min=1.0 / math.sqrt(c * h * w))
    x = (x - mean) / std
    rows, cols = h // patch, w // patch
    flat = F.unfold(x, (patch, patch), stride=(patch, patch))  # [B, C*p*p, L]
    flat = flat.reshape(b, c, patch, patch, rows * cols).permute(0, 4, 2, 3, 1).reshape(b, rows * cols, -1)
    row_ids = torch.arange(rows, device=x.device).repeat_interleave(cols) + 1
    col_ids = torch.arange(cols, device=x.device).repeat(rows) + 1
    ids = torch.stack([row_ids, col_ids], dim=-1).float().expand(b, -1, -1)
    return torch.cat([ids, flat], dim=-1)


@register_teacher("pix2struct")
def build_pix2struct(spec: TeacherSpec, device: torch.device) -> Teacher:
    from transformers import AutoConfig, Pix2StructForConditionalGeneration, Pix2StructVisionModel

    spec = with_source(spec, DEFAULT_SOURCES["pix2struct"])
    try:
        model_type = AutoConfig.from_pretrained(spec.source).model_type
    except (OSError, ValueError) as e:
        raise ValueError(f"teacher {spec.name}: cannot read a config from {spec.source!r}: {e}") from e
    if model_type == "pix2struct":  # a full image-to-text checkpoint: keep only its vision encoder
        model = load_hf(Pix2StructForConditionalGeneration, spec, device).encoder
    else:
        model = load_hf(Pix2StructVisionModel, spec, device)
    return Pix2StructTeacher(spec, model, device, spec.resolution or 512)
