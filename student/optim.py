"""AdamW with decay/no-decay groups, warmup + cosine schedule, gradient clipping, step counting.

Decisions:
- AdamW with torch defaults (betas 0.9/0.999, eps 1e-8) = HF Trainer's ``adamw_torch`` that the
  released scripts use. Only ``requires_grad`` parameters are handed to it.
- Biases, norm weights and every other 1-D tensor go in a no-decay group (HF Trainer's rule,
  which LLaVA inherits); the groups are always built, so weight_decay=0 (the recipe) is simply
  both groups at 0. MoLE's per-expert ``b_bias`` is 2-D but a bias: matched by name.
- Schedule: ``transformers.get_cosine_schedule_with_warmup`` with
  ``warmup = ceil(warmup_ratio * total_steps)`` exactly as HF Trainer computes it.
- Steps: one optimizer step per ``grad_accum`` micro-batches; an epoch's last window may be
  shorter (HF Trainer steps on it too). ``max_steps`` caps the total; the schedule is laid out
  over the capped total, so it is part of a run's identity (see ``student.checkpoint``).
- Clipping uses ``torch.nn.utils.clip_grad_norm_``, which also handles FSDP2's DTensor grads; the
  returned norm is made a plain tensor (``full_tensor``) for logging.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from student.config import TrainConfig


def _no_decay(name: str, p: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim < 2 or "bias" in leaf or "norm" in name.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over trainable parameters: decayed matrices, undecayed biases/norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (call set_trainable first)")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule != "cosine":
        raise ValueError(f"unsupported schedule {cfg.schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(cfg, total_steps), total_steps)


def steps_per_epoch(batches_per_epoch: int, grad_accum: int) -> int:
    return math.ceil(batches_per_epoch / grad_accum)


def total_steps(batches_per_epoch: int, cfg: TrainConfig) -> int:
    """Optimizer steps of the whole run: epochs x ceil(batches / accum), capped by max_steps."""
    if batches_per_epoch < 1:
        raise ValueError("the sampler yields no batch for this rank (empty dataset?)")
    steps = cfg.epochs * steps_per_epoch(batches_per_epoch, cfg.grad_accum)
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip in place; return the total norm before clipping as a plain 0-dim tensor."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
