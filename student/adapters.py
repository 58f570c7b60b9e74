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
  pipeline/). Token order is the cache's row-major grid order; ``token_linear`` is order-agnostic
  (a dense map over all tokens), so SAM's released layout scramble does not matter here.
- Inputs are cast to the adapter's parameter dtype (caches hold bf16/fp16/dequantised values).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cache.manifest import CacheManifest, TeacherEntry

KINDS = ("auto", "token_linear", "mlp")


def _check_input(x: torch.Tensor, tokens: int, channels: int, what: str) -> None:
    if x.dim() != 3 or x.shape[1] != tokens or x.shape[2] != channels:
        raise ValueError(f"{what} expects [batch, {tokens}, {channels}] teacher tokens, got shape {tuple(x.shape)}")


class TokenLinearAdapter(nn.Module):
    """Released adapter: channel Linear + GELU, then a Linear over the token axis."""

    def __init__(self, channels: int, tokens: int, student_dim: int = 1024, student_tokens: int = 576) -> None:
        super().__init__()
        for name, v in (
            ("channels", channels),
            ("tokens", tokens),
            ("student_dim", student_dim),
            ("student_tokens", student_tokens),
        ):
            if v < 1:
                raise ValueError(f"TokenLinearAdapter: {name} must be >= 1, got {v}")
        self.channels, self.tokens = channels, tokens
        self.channel_proj = nn.Linear(channels, student_dim)  # released adapter_1 (W1)
        self.act = nn.GELU()
        self.token_proj = nn.Linear(tokens, student_tokens)  # released adapter_2 (W2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.tokens, self.channels, "TokenLinearAdapter")
        h = self.act(self.channel_proj(x.to(self.channel_proj.weight.dtype)))  # [B, N, D]
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


def build_adapter(entry: TeacherEntry, student_dim: int, student_tokens: int, kind: str = "auto") -> nn.Module:
    if kind not in KINDS:
        raise ValueError(f"adapter kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "token_linear" if entry.resample == "none" else "mlp"
    cls = TokenLinearAdapter if kind == "token_linear" else MLPAdapter
    return cls(entry.channels, entry.tokens, student_dim, student_tokens)


def build_adapters(
    teacher_entries: Iterable[TeacherEntry],
    student_dim: int,
    student_tokens: int,
    kind: str = "auto",
    exclude: Iterable[str] = (),
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
        adapters[t.name] = build_adapter(t, student_dim, student_tokens, kind)
    return adapters


def adapters_from_manifest(
    manifest: CacheManifest, student_dim: int = 1024, student_tokens: int = 576, kind: str = "auto"
) -> nn.ModuleDict:
    """``build_adapters`` for every teacher of a cache, excluding its ``cls_teacher``."""
    exclude = (manifest.cls_teacher,) if manifest.cls_teacher is not None else ()
    return build_adapters(manifest.teachers, student_dim, student_tokens, kind, exclude)


def apply_adapters(adapters: nn.ModuleDict, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapted teacher tokens by name; teachers without an adapter (CLIP) pass through raw."""
    extra = sorted(set(adapters) - set(features))
    if extra:
        raise ValueError(f"no cached features for adapted teacher(s) {extra} (have {sorted(features)})")
    return {name: adapters[name](x) if name in adapters else x for name, x in features.items()}
