"""Attention-guided multi-teacher KD loss (docs/method.md §6) and the total training loss.

Inputs: student patch tokens S ``[B, N, D]`` (student ``hidden_states[-2][:, 1:]``), adapted
teacher tokens ``{name: [B, N, D]}`` (the CLIP teacher raw), the cached CLIP-teacher ``cls_attn``
A ``[B, N]`` and ``cls_state`` ``[B, D]``. N is taken from S (576 for ViT-L/14-336).

  l_{b,j,k} = mean_c (S - T~_k)^2_{b,j,c}
  L_{b,k}   = sum_j w_{b,j} l_{b,j,k}, with w = 1/N + softmax_j(A)  ("attention", released)
                                       or   w = 1/N                 ("uniform", released flag off)
  L_kd      = mean_b sum_k W_tea_{b,k} L_{b,k}

Teacher weights (``teacher_weighting``):
- "released": s_{b,k} = mean_j <cls_b, T~_{k,b,j}>; w' = softmax over the non-CLIP teachers;
  if max_k (mean_b w'_{b,k}) > flatten_threshold then w' <- softmax(w' + flatten_bonus);
  W_tea = [clip_weight for CLIP, (1 - clip_weight) * w' for the others].
  * The condition is "max over teachers of the batch-mean weight", as in the released code
    (``else_weight.mean(0).max() > 0.8``), not "batch-mean of the per-sample max" (these differ
    when samples prefer different teachers). Evaluated with ``torch.where``: no host sync.
  * softmax is shift-invariant, so ``softmax(w' + 0.2) == softmax(w')``: the bonus is a no-op and
    the flattening comes from re-applying softmax to probabilities in [0, 1] (e.g. 3 teachers
    (0.9, 0.05, 0.05) -> (0.54, 0.23, 0.23)). With a single non-CLIP teacher w' = (1) always, so
    the branch always fires and leaves (1): W_tea = (0.8, 0.2) and no gradient reaches s. We
    apply it literally (add, then softmax), so the bonus stays a config knob that does nothing.
  * s is not detached: gradients reach the adapters through the teacher weights, as released.
  * A single teacher (CLIP alone or any one teacher) gets weight 1, and a teacher set without
    the CLIP teacher gets softmax_k(s) over all teachers: both are the explicit branches of the
    released code as found in public forks (``num_teachers == 1`` / no ``'CLIP'``).
- "paper": W_tea = softmax_k( mean_j <cls_b, T~_{k,b,j}> / sqrt(D) ) over every teacher incl.
  CLIP (CLS-to-teacher attention, scaled dot product, averaged over the teacher's tokens).
- "fixed": the released ``teacher_weight=False`` path: clip_weight for CLIP, the rest split evenly
  (1/K each without CLIP, 1 for a single teacher).

Losses are computed in float32 (float64 if an input is float64), whatever the model dtype; the
released code computed them in bf16. Logged parts are detached; only ``loss`` carries the graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cache.strict import from_mapping
from student.mole import MoLEConfig

TOKEN_WEIGHTINGS = ("attention", "uniform")
TEACHER_WEIGHTINGS = ("released", "paper", "fixed")


@dataclass(frozen=True)
class KDConfig:
    token_weighting: str = "attention"
    teacher_weighting: str = "released"
    clip_weight: float = 0.8
    flatten_threshold: float = 0.8
    flatten_bonus: float = 0.2
    kd_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(
                f"KDConfig.token_weighting must be one of {TOKEN_WEIGHTINGS}, got {self.token_weighting!r}"
            )
        if self.teacher_weighting not in TEACHER_WEIGHTINGS:
            raise ValueError(
                f"KDConfig.teacher_weighting must be one of {TEACHER_WEIGHTINGS}, got {self.teacher_weighting!r}"
            )
        if not 0.0 <= self.clip_weight <= 1.0:
            raise ValueError(f"KDConfig.clip_weight must be in [0, 1], got {self.clip_weight}")
        if self.kd_weight < 0:
            raise ValueError(f"KDConfig.kd_weight must be >= 0, got {self.kd_weight}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KDConfig:
        return from_mapping(cls, d)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _validate(student, teachers, cls_attn, cls_state, cfg) -> None:
    if student.dim() != 3:
        raise ValueError(f"student tokens must be [batch, tokens, dim], got shape {tuple(student.shape)}")
    if not teachers:
        raise ValueError("kd_loss needs at least one teacher")
    for name, t in teachers.items():
        if t.shape != student.shape:
            raise ValueError(
                f"teacher {name!r} tokens {tuple(t.shape)} do not match the student's "
                f"{tuple(student.shape)} (adapt them first)"
            )
    b, n, d = student.shape
    if cfg.token_weighting == "attention":
        if cls_attn is None or tuple(cls_attn.shape) != (b, n):
            got = None if cls_attn is None else tuple(cls_attn.shape)
            raise ValueError(f"token_weighting='attention' needs cls_attn of shape {(b, n)}, got {got}")
    if cfg.teacher_weighting in ("released", "paper"):
        if cls_state is None or tuple(cls_state.shape) != (b, d):
            got = None if cls_state is None else tuple(cls_state.shape)
            raise ValueError(
                f"teacher_weighting={cfg.teacher_weighting!r} needs cls_state of shape {(b, d)}, got {got}"
            )


def token_weights(cls_attn: torch.Tensor | None, batch: int, tokens: int, cfg: KDConfig, dtype) -> torch.Tensor:
    """Per-token multipliers ``[B, N]``: 1/N (+ softmax of the CLS attention row)."""
    if cfg.token_weighting == "uniform":
        device = cls_attn.device if cls_attn is not None else None
        return torch.full((batch, tokens), 1.0 / tokens, dtype=dtype, device=device)
    return 1.0 / tokens + cls_attn.to(dtype).softmax(dim=-1)


def teacher_scores(teachers: Mapping[str, torch.Tensor], cls_state: torch.Tensor, dtype) -> torch.Tensor:
    """s_{b,k} = mean_j <cls_b, T~_{k,b,j}>, ``[B, K]`` in the order of ``teachers``."""
    cls = cls_state.to(dtype)
    return torch.stack([torch.einsum("bnd,bd->bn", t.to(dtype), cls).mean(dim=1) for t in teachers.values()], dim=1)


def _released_weights(scores, names, clip_name, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    batch, k = scores.shape
    flattened = scores.new_zeros(())
    if k == 1:
        return scores.new_ones(batch, 1), flattened
    if clip_name not in names:
        return scores.softmax(dim=-1), flattened
    others = [i for i, n in enumerate(names) if n != clip_name]
    w = scores[:, others].softmax(dim=-1)
    flattened = (w.mean(dim=0).max() > cfg.flatten_threshold).to(scores.dtype)
    w = torch.where(flattened.bool(), (w + cfg.flatten_bonus).softmax(dim=-1), w)
    it = iter(w.unbind(dim=1))
    cols = [
        scores.new_full((batch,), cfg.clip_weight) if n == clip_name else (1.0 - cfg.clip_weight) * next(it)
        for n in names
    ]
    return torch.stack(cols, dim=1), flattened


def _fixed_weights(batch, names, clip_name, cfg, dtype, device) -> torch.Tensor:
    k = len(names)
    if k == 1:
        row = [1.0]
    elif clip_name in names:
        row = [cfg.clip_weight if n == clip_name else (1.0 - cfg.clip_weight) / (k - 1) for n in names]
    else:
        row = [1.0 / k] * k
    return torch.tensor(row, dtype=dtype, device=device).expand(batch, k)


def teacher_weights(teachers, cls_state, cfg: KDConfig, clip_name: str | None, dtype):
    """(W_tea ``[B, K]`` in the order of ``teachers``, flattened flag as a 0-dim tensor)."""
    names = list(teachers)
    ref = next(iter(teachers.values()))
    if cfg.teacher_weighting == "fixed":
        w_tea = _fixed_weights(ref.shape[0], names, clip_name, cfg, dtype, ref.device)
        return w_tea, torch.zeros((), dtype=dtype, device=ref.device)
    scores = teacher_scores(teachers, cls_state, dtype)
    if cfg.teacher_weighting == "paper":
        return (scores / math.sqrt(ref.shape[-1])).softmax(dim=-1), scores.new_zeros(())
    return _released_weights(scores, names, clip_name, cfg)


def kd_loss(
    student: torch.Tensor,
    teachers: Mapping[str, torch.Tensor],
    cls_attn: torch.Tensor | None = None,
    cls_state: torch.Tensor | None = None,
    cfg: KDConfig = KDConfig(),
    clip_name: str | None = "clip",
) -> dict[str, torch.Tensor]:
    """L_kd and its logged parts: ``kd/<t>`` (mean_b W L), ``kd_unweighted/<t>`` (mean_b L),
    ``weight/<t>`` (mean_b W), ``kd_info/flattened`` (1 if the released flattening fired)."""
    _validate(student, teachers, cls_attn, cls_state, cfg)
    dtype = _compute_dtype(student, cls_attn, cls_state, *teachers.values())
    s = student.to(dtype)
    batch, tokens, _ = s.shape
    tok_w = token_weights(cls_attn, batch, tokens, cfg, dtype).to(s.device)
    per_teacher = torch.stack(
        [((s - t.to(dtype)).pow(2).mean(dim=-1) * tok_w).sum(dim=-1) for t in teachers.values()], dim=1
    )  # L_{b,k}: [B, K]
    w_tea, flattened = teacher_weights(teachers, cls_state, cfg, clip_name, dtype)
    weighted = w_tea * per_teacher
    out = {"loss": weighted.sum(dim=1).mean()}
    for k, name in enumerate(teachers):
        out[f"kd/{name}"] = weighted[:, k].mean().detach()
        out[f"kd_unweighted/{name}"] = per_teacher[:, k].mean().detach()
        out[f"weight/{name}"] = w_tea[:, k].mean().detach()
    out["kd_info/flattened"] = flattened.detach()
    return out


def total_loss(
    text_loss: torch.Tensor,
    balance_loss: torch.Tensor | None,
    kd_out: Mapping[str, torch.Tensor] | None,
    cfg: KDConfig = KDConfig(),
    balance_weight: float = MoLEConfig.balance_weight,
) -> dict[str, torch.Tensor]:
    """L = L_text + balance_weight * L_bal + cfg.kd_weight * L_kd; ``None`` parts count as 0.

    ``balance_weight`` defaults to ``MoLEConfig.balance_weight`` (0.01); pass the run's value.
    """
    loss = text_loss
    out = {"loss/text": text_loss.detach()}
    if balance_loss is not None:
        loss = loss + balance_weight * balance_loss
        out["loss/balance"] = balance_loss.detach()
    if kd_out is not None:
        if "loss" not in kd_out:
            raise ValueError("kd_out must be the dict returned by kd_loss (it has no 'loss')")
        loss = loss + cfg.kd_weight * kd_out["loss"]
        out["loss/kd"] = kd_out["loss"].detach()
        out.update({k: v for k, v in kd_out.items() if k != "loss"})
    return {"loss": loss, **out}
