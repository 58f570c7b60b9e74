"""Teacher config, registry and the common Teacher API (features out as ``[B, N, C]`` + grid).

Decisions:
- ``TeacherSpec`` is the one config dataclass for a teacher; families are looked up by name in a
  registry (``@register_teacher("clip")``, timm's ``@register_model`` pattern). Generic families
  carry their argument after a colon: ``hf:<path-or-id>``, ``timm:<model_name>``.
- Every teacher is built once, frozen (``eval()``, ``requires_grad_(False)``), and probed with one
  "no image" input at build time. The probe fixes ``native_grid`` and ``channels`` from the real
  output and fails fast on a broken spec, before any extraction loop starts.
- ``encode`` runs under ``torch.inference_mode()``; ``compute_dtype="auto"`` means bf16 autocast on
  CUDA and fp32 on CPU. Weights stay fp32 (autocast casts per op), outputs are returned as fp32.
- ``weights_fingerprint`` = sha256 over, per state-dict entry in sorted name order, the name,
  dtype, shape and the raw bytes of 1024 evenly strided elements plus the last element, preceded
  by the architecture overrides (model class / timm arch and ``model_kwargs``), which change the
  output without always changing the weights. Cheap (a few MB hashed for a 1B model), identical on
  CPU and GPU, and any retrained or swapped checkpoint changes it with overwhelming probability.
- ``resample`` (area = adaptive average pooling, bilinear = ``F.interpolate`` with
  ``align_corners=False`` and no antialias) resizes the token grid at extraction time and is
  recorded in the manifest entry with ``native_grid``. A teacher that emits ``cls_attn`` (the CLIP
  teacher) cannot be resampled to a different grid: that row indexes its native patch tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cache.manifest import ALPHA_MODES, ASPECT_MODES, RESAMPLE_MODES, PreprocessSpec, TeacherEntry
from cache.strict import from_mapping

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FINGERPRINT_SAMPLES = 1024


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher to run and how. ``source`` is a local path or hub id (timm: a checkpoint file
    or hub id); empty means the family's released default. ``layer`` picks the tapped layer where a
    family allows it (None = the family default). ``arch`` names the timm architecture for
    ``eva``/``convnext`` when ``source`` is a file. ``model_kwargs`` go to the model constructor
    (timm ``create_model`` kwargs, or HF ``from_pretrained`` config overrides). ``alpha`` is the
    preprocessing's alpha mode (``drop`` as released, or ``white``), whatever the family."""

    name: str
    family: str
    source: str = ""
    resolution: int | None = None
    aspect: str = "square"
    alpha: str = "drop"
    resample: str = "none"
    resample_grid: tuple[int, int] = (24, 24)
    compute_dtype: str = "auto"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    layer: int | None = None
    arch: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resample_grid", tuple(int(v) for v in self.resample_grid))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        if not self.name or "/" in self.name:
            raise ValueError(f"teacher name {self.name!r} must be non-empty and contain no '/'")
        if not self.family:
            raise ValueError(f"teacher {self.name}: 'family' must be set")
        checks = [
            (self.aspect in ASPECT_MODES, f"aspect must be one of {ASPECT_MODES}, got {self.aspect!r}"),
            (self.alpha in ALPHA_MODES, f"alpha must be one of {ALPHA_MODES}, got {self.alpha!r}"),
            (self.resample in RESAMPLE_MODES, f"resample must be one of {RESAMPLE_MODES}, got {self.resample!r}"),
            (
                self.compute_dtype in COMPUTE_DTYPES,
                f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}",
            ),
            (
                len(self.resample_grid) == 2 and min(self.resample_grid) > 0,
                f"resample_grid must be two positive ints, got {self.resample_grid}",
            ),
            (self.resolution is None or int(self.resolution) > 0, f"resolution must be > 0, got {self.resolution}"),
            (self.layer is None or isinstance(self.layer, int), f"layer must be an int or None, got {self.layer!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"teacher {self.name}: {msg}")
        try:
            json.dumps(self.model_kwargs, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"teacher {self.name}: model_kwargs must be JSON-serialisable ({e})") from e

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resample_grid"] = list(self.resample_grid)
        d["model_kwargs"] = dict(self.model_kwargs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherSpec:
        name = d.get("name") if isinstance(d, Mapping) else None
        return from_mapping(cls, d, f"teacher {name!r}")


@dataclass
class TeacherOutput:
    """``tokens`` [B, N, C] fp32 in row-major grid order; ``cls_state`` [B, C] and ``cls_attn``
    [B, N] (the CLS query's head-mean attention over the patch keys) where the teacher has them."""

    tokens: torch.Tensor
    cls_state: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None


@dataclass
class NativeOutput:
    """What a family's ``_forward`` returns: tokens at the native grid, before resampling."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    cls_state: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None


class Teacher:
    """A frozen encoder behind the common API. Subclasses implement ``_forward``."""

    def __init__(
        self,
        spec: TeacherSpec,
        model: torch.nn.Module,
        device: torch.device | str,
        preprocess_spec: PreprocessSpec,
        layer: str,
        has_cls: bool = False,
        arch_info: Mapping[str, Any] | None = None,
    ):
        self.spec = spec
        self.device = torch.device(device)
        self.preprocess_spec = dataclasses.replace(preprocess_spec, alpha=spec.alpha)
        self.layer = layer
        self.has_cls = has_cls
        model.eval().requires_grad_(False)
        self.weights_fingerprint = weights_fingerprint(model, arch_info or {})
        self.model = model.to(self.device)
        self.dtype = resolve_compute_dtype(spec.compute_dtype, self.device)
        try:
            probe = self._native(self._null_batch())
        except (TypeError, RuntimeError, IndexError) as e:
            r = preprocess_spec.resolution
            raise ValueError(f"teacher {spec.name}: a forward pass on a [1, 3, {r}, {r}] input failed: {e}") from e
        self.native_grid = probe.grid
        self.channels = int(probe.tokens.shape[-1])
        self.grid = spec.resample_grid if spec.resample != "none" else probe.grid
        if probe.cls_attn is not None and self.grid != self.native_grid:
            raise ValueError(
                f"teacher {spec.name}: resample={spec.resample!r} to {self.grid} would misalign cls_attn "
                f"with the native {self.native_grid} patch grid; keep resample='none' for the CLS teacher"
            )

    # -- the common API ------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def name(self) -> str:
        return self.spec.name

    def encode(self, pixels: torch.Tensor | np.ndarray) -> TeacherOutput:
        """``pixels`` [B, 3, R, R] from ``cache.preprocess.preprocess_image`` -> TeacherOutput."""
        pixels = self._check_pixels(pixels)
        out = self._native(pixels)
        if out.grid != self.native_grid:
            raise ValueError(f"teacher {self.name}: grid changed from {self.native_grid} to {out.grid}")
        tokens = out.tokens
        if self.spec.resample != "none":
            tokens = resample_tokens(tokens, out.grid, self.grid, self.spec.resample)
        return TeacherOutput(tokens=tokens, cls_state=out.cls_state, cls_attn=out.cls_attn)

    def manifest_entry(self, codec: str) -> TeacherEntry:
        resampled = self.spec.resample != "none"
        return TeacherEntry(
            name=self.spec.name,
            family=self.spec.family,
            source=self.spec.source,
            weights_fingerprint=self.weights_fingerprint,
            layer=self.layer,
            tokens=self.tokens,
            grid=self.grid,
            channels=self.channels,
            compute_dtype=str(self.dtype).removeprefix("torch."),
            preprocess=self.preprocess_spec,
            codec=codec,
            resample=self.spec.resample,
            native_grid=self.native_grid if resampled else None,
            has_cls=self.has_cls,
        )

    # -- internals -----------------------------------------------------------------------
    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        raise NotImplementedError

    def _native(self, pixels: torch.Tensor) -> NativeOutput:
        autocast = self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            out = self._forward(pixels)
        tokens = out.tokens.float()
        if tokens.ndim != 3 or tokens.shape[1] != out.grid[0] * out.grid[1]:
            raise ValueError(f"teacher {self.spec.name}: tokens {tuple(tokens.shape)} do not match grid {out.grid}")
        return NativeOutput(
            tokens=tokens.contiguous(),
            grid=tuple(int(v) for v in out.grid),
            cls_state=None if out.cls_state is None else out.cls_state.float(),
            cls_attn=None if out.cls_attn is None else out.cls_attn.float(),
        )

    def _null_batch(self) -> torch.Tensor:
        r = self.preprocess_spec.resolution
        return torch.zeros(1, 3, r, r, device=self.device)

    def _check_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        r = self.preprocess_spec.resolution
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise ValueError(f"teacher {self.name}: pixels must be [B, 3, {r}, {r}], got {tuple(pixels.shape)}")
        return pixels.to(self.device, torch.float32)


# -- helpers shared by the families --------------------------------------------------------
def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def weights_fingerprint(model: torch.nn.Module, arch_info: Mapping[str, Any]) -> str:
    """Sampled sha256 of the state dict (see module docstring for exactly what is hashed)."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(arch_info), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        h.update(f"|{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        if n == 0:
            continue
        sample = torch.cat([flat[:: max(1, n // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES], flat[-1:]])
        h.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sampled-sha256:" + h.hexdigest()


def resample_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a row-major token grid [B, h*w, C] to ``target`` and flatten it row-major again."""
    b, n, c = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"resample: {n} tokens do not form a {grid} grid")
    x = tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1]).float()
    if mode == "area":
        x = F.adaptive_avg_pool2d(x, target)
    elif mode == "bilinear":
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"resample mode must be 'area' or 'bilinear', got {mode!r}")
    return x.flatten(2).transpose(1, 2).contiguous()


def square_grid(resolution: int, patch: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    """Patch grid of a ViT at a square input. A stride-p patch convolution drops the remainder
    (SigLIP-so400m: 384 px / 14 px patches -> 27 x 27), so this floors."""
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    if resolution < max(ph, pw):
        raise ValueError(f"{what}: resolution {resolution} is smaller than the patch size {(ph, pw)}")
    return resolution // ph, resolution // pw


def with_source(spec: TeacherSpec, default: str) -> TeacherSpec:
    """The spec with an empty ``source`` replaced by ``default`` (so the manifest records it)."""
    return spec if spec.source else dataclasses.replace(spec, source=default)


def clip_style_preprocess(
    resolution: int, aspect: str, mean=CLIP_MEAN, std=CLIP_STD, interpolation: str = "bicubic"
) -> PreprocessSpec:
    """CLIPImageProcessor-style: shortest edge, centre crop (docs/method.md §3)."""
    return PreprocessSpec(
        resolution=resolution,
        resize="shortest_edge",
        crop="center",
        pad="none",
        aspect=aspect,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
