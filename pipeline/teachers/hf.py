"""Hugging Face teachers: sam, dinov2, siglip, pix2struct and generic ``hf:<path-or-id>``.

Decisions:
- Loading: ``<Class>.from_pretrained(source, attn_implementation=..., dtype=float32,
  output_loading_info=True)``. transformers only *warns* about weights missing from a checkpoint
  and initialises them randomly, so a missing (except pooler/head weights, which feed no hidden
  state) or shape-mismatched key is a ``ValueError`` here.
  Unexpected keys are fine: vision classes load from full checkpoints (``CLIPVisionModel`` from a
  CLIPModel checkpoint, ``SamVisionModel`` from a SamModel one) and skip the other towers.
  transformers' key-by-key report of them is held back (``cache.load_report``) and one line says
  what was dropped (logger ``movekd.load``; the extraction runners say it once, not per actor); a
  load that fails its checks prints transformers' report too.
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
import logging
import math

import torch
import torch.nn.functional as F

from cache.load_report import LOAD_NOTES, NOTE, dropped_weights_note, held_load_report
from pipeline.teachers.base import NativeOutput, Teacher, TeacherSpec, with_source
from pipeline.teachers.hf_info import (
    DEFAULT_SOURCES,
    SAM_LAYER,
    TeacherInfo,
    config_image_size,
    dinov2_info,
    generic_info,
    generic_source,
    pix2struct_info,
    pix2struct_patch,
    sam_info,
    siglip_info,
    siglip_layer,
)
from pipeline.teachers.registry import register_teacher

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
        with held_load_report() as report:
            model, info = cls.from_pretrained(
                source,
                attn_implementation=attn_implementation(cls, device, spec),
                dtype=torch.float32,
                output_loading_info=True,
                **spec.model_kwargs,
            )
    except (OSError, ValueError) as e:
        raise ValueError(f"teacher {spec.name}: cannot load {cls.__name__} from {source!r}: {e}") from e
    absent = sorted(info.get("missing_keys") or [])
    missing = [k for k in absent if not k.startswith(_OUTPUT_ONLY_PREFIXES)]
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        report.release()
        raise ValueError(
            f"teacher {spec.name}: {source!r} is not a complete {cls.__name__} checkpoint: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, mismatched {mismatched[:6]}"
        )
    unexpected = info.get("unexpected_keys") or []
    if unexpected or absent:
        note = dropped_weights_note(spec.name, cls.__name__, source, unexpected, checkpoint_class(source), absent)
        logging.getLogger(LOAD_NOTES).info(note, extra=NOTE)
    return model


def checkpoint_class(source: str) -> str | None:
    """The model class a checkpoint was saved from (its config's ``architectures``), if it says."""
    from transformers import AutoConfig

    try:
        arch = AutoConfig.from_pretrained(source).architectures
    except (OSError, ValueError):
        return None
    return arch[0] if arch else None


def accepts_kwarg(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


# -- hidden-state teachers (dinov2, siglip, generic hf) -------------------------------------
class HFTeacher(Teacher):
    """Patch tokens of ``hidden_states[layer]`` or ``last_hidden_state`` of an HF vision model."""

    def __init__(self, spec: TeacherSpec, model, device, info: TeacherInfo, layer: int | None):
        self.hs_layer = layer
        self.patch_grid = info.native_grid
        self.forward_kwargs = {}
        if info.preprocess.resolution != config_image_size(model.config) and accepts_kwarg(
            model, "interpolate_pos_encoding"
        ):
            self.forward_kwargs["interpolate_pos_encoding"] = True
        super().__init__(
            spec,
            model,
            device,
            info.preprocess,
            layer=info.layer,
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
    return HFTeacher(spec, model, device, dinov2_info(spec, model.config), spec.layer)


@register_teacher("siglip")
def build_siglip(spec: TeacherSpec, device: torch.device) -> Teacher:
    from transformers import SiglipVisionModel

    spec = with_source(spec, DEFAULT_SOURCES["siglip"])
    model = load_hf(SiglipVisionModel, spec, device)
    return HFTeacher(spec, model, device, siglip_info(spec, model.config), siglip_layer(spec))


@register_teacher("hf:")
def build_hf_generic(spec: TeacherSpec, device: torch.device) -> Teacher:
    """``hf:<path-or-id>`` (or family ``hf`` with ``source``): any AutoModel vision backbone whose
    forward takes ``pixel_values`` and whose config has ``patch_size``."""
    from transformers import AutoModel

    spec = generic_source(spec)
    model = load_hf(AutoModel, spec, device)
    return HFTeacher(spec, model, device, generic_info(spec, model.config), spec.layer)


# -- sam -----------------------------------------------------------------------------------
class SamTeacher(Teacher):
    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        feats = self.model(pixel_values=pixels).last_hidden_state  # [B, C, H, W] neck output
        return NativeOutput(tokens=feats.flatten(2).transpose(1, 2), grid=tuple(feats.shape[-2:]))


@register_teacher("sam")
def build_sam(spec: TeacherSpec, device: torch.device) -> Teacher:
    from transformers import SamVisionModel

    spec = with_source(spec, DEFAULT_SOURCES["sam"])
    if spec.layer is not None:  # before loading: no point reading the weights
        sam_info(spec, None)
    model = load_hf(SamVisionModel, spec, device)
    info = sam_info(spec, model.config)
    return SamTeacher(
        spec,
        model,
        device,
        info.preprocess,
        layer=SAM_LAYER,
        arch_info={"class": type(model).__name__, "model_kwargs": spec.model_kwargs},
    )


# -- pix2struct ----------------------------------------------------------------------------
class Pix2StructTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, model, device):
        info = pix2struct_info(spec, model.config)
        self.patch = pix2struct_patch(spec, model.config)
        self.patch_grid = info.native_grid
        self.hs_layer = spec.layer
        super().__init__(
            spec,
            model,
            device,
            info.preprocess,
            layer=info.layer,
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
    return Pix2StructTeacher(spec, model, device)
