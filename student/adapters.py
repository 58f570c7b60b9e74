"""Per-teacher adapters: cached teacher tokens ``[B, N, C]`` -> student token space ``[B, 576, D]``.

Decisions (docs/method.md §4):
- ``token_linear`` (released, ``move_llava_llama.py``): H = GELU(T W1^T + b1) ``[B, N, D]``, then
  a Linear over the token axis (N -> student tokens), no activation after it. Exact-erf GELU as
  ``torch.nn.GELU()`` in the released code; default ``nn.Linear`` init as released.
- ``mlp`` for caches resampled to the student's grid at extraction time: Linear C->D, GELU,
  Linear D->D per token; the token count must already equal the student's.
- ``auto`` picks ``token_linear`` for native grids (``resample == "none"``) and ``mlp`` otherwise.
- The CLIP teacher (the manifest's ``cls_teacher``) gets no adapter: its tokens are the target
  as is, so its channels/tokens must equal the student's (checked here, at build time).
- Adapters are built from ``cache.manifest.TeacherEntry`` only (the manifest is the contract with
  pipeline/). The cache holds every teacher in row-major grid order ``[B, H*W, C]``.
- SAM's released layout (docs/method.md §4): the released code flattens HF's channels-first neck
  output ``[B, C, H, W]`` to ``[B, C*H, W]``, reads that as a ``sqrt(C*H)``-square image with ``W``
  channels, ``pixel_unshuffle``s it by 2 and views the result as tokens. That moves values between
  the token and channel axes (a token's 256 "channels" are 64 neck columns x 2 x 2 sub-positions),
  so it is NOT equivalent to the row-major layout under any adapter weights: ``token_linear``'s
  channel Linear is shared across tokens and sees different values. ``layout="released_sam"``
  replays that exact op sequence on the cached tokens before the adapter (so released SAM adapter
  weights and the released training behaviour are reproduced); ``row_major`` uses the cache as is.
  ``TrainConfig.sam_layout`` picks it for teachers of family ``sam``.
- Inputs are cast to the adapter's parameter dtype (caches hold bf16/fp16/dequantised values).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from cache.manifest import CacheManifest, TeacherEntry

KINDS = ("auto", "token_linear", "mlp")
LAYOUTS = ("row_major", "released_sam")
SAM_LAYOUTS = {"released": "released_sam", "honest": "row_major"}  # TrainConfig.sam_layout -> layout


def released_sam_geometry(grid: tuple[int, int], channels: int) -> tuple[int, int]:
    """(tokens, channels) after the released SAM op sequence on a ``channels x grid`` neck output."""
    h, w = grid
    side = math.isqrt(channels * h)
    if side * side != channels * h or side % 2:
        raise ValueError(
            f"the released SAM layout needs channels x rows to be an even square (256 x 64 = 128^2 for "
            f"SAM-L's neck); this teacher has {channels} channels on a {h}x{w} grid: set sam_layout: honest"
        )
    return side * side // 4, 4 * w


def released_sam_layout(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major cached SAM tokens ``[B, H*W, C]`` -> the released code's adapter input.

    Replays ``sam_encoder.py`` (``last_hidden_state.flatten(1, 2)``, ``transpose(1, 2).reshape(b, c,
    h, w)``, ``pixel_unshuffle(., 2)``) and ``move_llava_llama.py`` (``view(b, C', -1).permute(0, 2,
    1)``) on the neck output rebuilt from the cache.
    """
    b, n, c = x.shape
    neck = x.transpose(1, 2).reshape(b, c, *grid)  # HF SamVisionEncoder's [B, C, H, W]
    flat = neck.flatten(start_dim=1, end_dim=2)  # [B, C*H, W]
    _, n2, c2 = flat.shape
    side = math.isqrt(n2)
    img = torch.nn.functional.pixel_unshuffle(flat.transpose(1, 2).reshape(b, c2, side, side), 2)
    return img.reshape(b, img.size(1), -1).permute(0, 2, 1)  # [B, side^2/4, 4W]


def _check_input(x: torch.Tensor, tokens: int, channels: int, what: str) -> None:
    if x.dim() != 3 or x.shape[1] != tokens or x.shape[2] != channels:
        raise ValueError(f"{what} expects [batch, {tokens}, {channels}] teacher tokens, got shape {tuple(x.shape)}")


class TokenLinearAdapter(nn.Module):
    """Released adapter: channel Linear + GELU, then a Linear over the token axis.

    ``channels``/``tokens`` are the cached teacher's; with ``layout="released_sam"`` (``grid``
    required) the inputs are first rearranged as the released code does for SAM, and the two
    Linears take the rearranged sizes (for SAM-L's 64x64x256 neck these are the same numbers).
    """

    def __init__(
        self,
        channels: int,
        tokens: int,
        student_dim: int = 1024,
        student_tokens: int = 576,
        layout: str = "row_major",
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("channels", channels),
            ("tokens", tokens),
            ("student_dim", student_dim),
            ("student_tokens", student_tokens),
        ):
            if v < 1:
                raise ValueError(f"TokenLinearAdapter: {name} must be >= 1, got {v}")
        if layout not in LAYOUTS:
            raise ValueError(f"TokenLinearAdapter: layout must be one of {LAYOUTS}, got {layout!r}")
        self.channels, self.tokens, self.layout = channels, tokens, layout
        self.grid = tuple(grid) if grid is not None else None
        in_tokens, in_channels = tokens, channels
        if layout == "released_sam":
            if self.grid is None or self.grid[0] * self.grid[1] != tokens:
                raise ValueError(f"TokenLinearAdapter: layout 'released_sam' needs the {tokens}-token grid, got {grid}")
            in_tokens, in_channels = released_sam_geometry(self.grid, channels)
        self.channel_proj = nn.Linear(in_channels, student_dim)  # released adapter_1 (W1)
        self.act = nn.GELU()
        self.token_proj = nn.Linear(in_tokens, student_tokens)  # released adapter_2 (W2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.tokens, self.channels, "TokenLinearAdapter")
        x = x.to(self.channel_proj.weight.dtype)
        if self.layout == "released_sam":
            x = released_sam_layout(x, self.grid)
        h = self.act(self.channel_proj(x))  # [B, N, D]
        return self.token_proj(h.transpose(1, 2)).transpose(1, 2)  # [B, student_tokens, D]


class MLPAdapter(nn.Module):
    """Two-layer channel MLP for teacher grids already resampled to the student's grid."""

    def __init__(self, channels: int, tokens: int, student_dim: int = 1024, student_tokens: int = 576) -> None:
        super().__init__()
        if tokens != student_tokens:
            raise ValueError(
                f"MLPAdapter needs the teacher grid at the student's token count: "
                f"tokens={tokens} != student_tokens={student_tokens} "
                "(use a resampled cache or the token_linear adapter)"
            )
        if channels < 1 or student_dim < 1:
            raise ValueError(f"MLPAdapter: channels and student_dim must be >= 1, got {channels}, {student_dim}")
        self.channels, self.tokens = channels, tokens
        self.fc1 = nn.Linear(channels, student_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(student_dim, student_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.tokens, self.channels, "MLPAdapter")
        return self.fc2(self.act(self.fc1(x.to(self.fc1.weight.dtype))))


def _check_raw_teacher(t: TeacherEntry, student_dim: int, student_tokens: int) -> None:
    if t.channels != student_dim or t.tokens != student_tokens:
        raise ValueError(
            f"teacher {t.name!r} is used without an adapter, so it must match the student: "
            f"it has {t.tokens} tokens x {t.channels} channels, the student "
            f"{student_tokens} x {student_dim}"
        )


def build_adapter(
    entry: TeacherEntry, student_dim: int, student_tokens: int, kind: str = "auto", sam_layout: str = "released"
) -> nn.Module:
    """The adapter for one cached teacher; ``sam_layout`` (``released``/``honest``) matters for
    family ``sam`` only: ``released`` needs the native neck grid and the ``token_linear`` kind."""
    if kind not in KINDS:
        raise ValueError(f"adapter kind must be one of {KINDS}, got {kind!r}")
    if sam_layout not in SAM_LAYOUTS:
        raise ValueError(f"sam_layout must be one of {tuple(SAM_LAYOUTS)}, got {sam_layout!r}")
    if kind == "auto":
        kind = "token_linear" if entry.resample == "none" else "mlp"
    released = entry.family == "sam" and sam_layout == "released"
    if released and (kind != "token_linear" or entry.resample != "none"):
        raise ValueError(
            f"teacher {entry.name!r}: sam_layout 'released' rearranges the native SAM neck grid for the "
            f"token_linear adapter; this cache has resample={entry.resample!r} and adapter kind {kind!r}: "
            "set sam_layout: honest"
        )
    if kind == "mlp":
        return MLPAdapter(entry.channels, entry.tokens, student_dim, student_tokens)
    layout = "released_sam" if released else "row_major"
    return TokenLinearAdapter(entry.channels, entry.tokens, student_dim, student_tokens, layout, entry.grid)


def build_adapters(
    teacher_entries: Iterable[TeacherEntry],
    student_dim: int,
    student_tokens: int,
    kind: str = "auto",
    exclude: Iterable[str] = (),
    sam_layout: str = "released",
) -> nn.ModuleDict:
    """One adapter per teacher, keyed by teacher name; teachers in ``exclude`` (the CLIP teacher)
    get none and are checked to already match the student's tokens and channels."""
    entries = list(teacher_entries)
    exclude = set(exclude)
    names = [t.name for t in entries]
    missing = sorted(exclude - set(names))
    if missing:
        raise ValueError(f"exclude names {missing} are not teachers ({names})")
    adapters = nn.ModuleDict()
    for t in entries:
        if not isinstance(t, TeacherEntry):
            raise ValueError(f"build_adapters takes cache.manifest.TeacherEntry objects, got {type(t).__name__}")
        if t.name in exclude:
            _check_raw_teacher(t, student_dim, student_tokens)
            continue
        if "." in t.name:
            raise ValueError(f"teacher name {t.name!r} cannot key an nn.ModuleDict (contains '.')")
        adapters[t.name] = build_adapter(t, student_dim, student_tokens, kind, sam_layout)
    return adapters


def adapters_from_manifest(
    manifest: CacheManifest,
    student_dim: int = 1024,
    student_tokens: int = 576,
    kind: str = "auto",
    sam_layout: str = "released",
) -> nn.ModuleDict:
    """``build_adapters`` for every teacher of a cache, excluding its ``cls_teacher``."""
    exclude = (manifest.cls_teacher,) if manifest.cls_teacher is not None else ()
    return build_adapters(manifest.teachers, student_dim, student_tokens, kind, exclude, sam_layout)


def apply_adapters(adapters: nn.ModuleDict, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapted teacher tokens by name; teachers without an adapter (CLIP) pass through raw."""
    extra = sorted(set(adapters) - set(features))
    if extra:
        raise ValueError(f"no cached features for adapted teacher(s) {extra} (have {sorted(features)})")
    return {name: adapters[name](x) if name in adapters else x for name, x in features.items()}
