"""The inner loop: data loading from a resumable position, one optimizer step over an
accumulation window, and the numbers logged for it.

Decisions:
- Resume position = (epoch, cursor), cursor = samples this rank consumed (trained on) in that
  epoch; counted by the trainer, never by what the loader has prefetched. ``SamplerPosition``
  applies it through ``student.sampler``'s cursor protocol (``advance`` per trained window, its
  ``state_dict`` checkpointed and validated on load): the one resume protocol.
- The DataLoader gets its own seeded generator: creating an iterator then does not draw from the
  global torch RNG, whose state (dropout) is part of the exact-resume contract.
- Accumulation: each micro-batch loss is divided by the window size (the number of micro-batches
  in this optimizer step; an epoch's last window may be short), the per-batch-mean convention of
  HF Trainer/LLaVA. Logged parts are window means of the detached parts.
- bf16 autocast on CUDA when enabled; fp32 on CPU (no autocast), which keeps CPU runs bit-exact.
- Encoded targets (``target_decode: device``) are dequantised right after the copy to the device,
  outside autocast, before the forward (``student.target_decode``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from student.distributed import grad_sync
from student.optim import clip_gradients
from student.target_decode import decode_batch_targets

_PROTOCOL = ("num_samples", "set_epoch", "advance", "state_dict", "load_state_dict")


class SamplerPosition:
    """Drives a sampler from the trainer's (epoch, cursor) position.

    One resume protocol (``student.sampler.DistributedLengthGroupedSampler``'s): ``num_samples``
    per rank per epoch, ``set_epoch``, ``advance`` per trained window, and a ``state_dict`` that
    is checkpointed and whose ``load_state_dict`` refuses a changed seed/world size/batch/grouping/
    dataset size. The sampler iterates from its own cursor; nothing is skipped by index.
    """

    def __init__(self, sampler) -> None:
        missing = [a for a in _PROTOCOL if not hasattr(sampler, a)]
        if missing:
            raise ValueError(
                f"the trainer needs a resumable sampler (student.sampler.DistributedLengthGroupedSampler); "
                f"{type(sampler).__name__} lacks {missing}"
            )
        self.sampler = sampler

    def samples_per_epoch(self) -> int:
        return int(self.sampler.num_samples)

    def reset(self) -> None:
        self.restore({**self.sampler.state_dict(), "epoch": 0, "cursor": 0}, 0, 0)

    def restore(self, state: dict | None, epoch: int, cursor: int) -> None:
        if state is None:
            raise ValueError(
                "the checkpoint holds no sampler state (it was written by an older movekd with a plain "
                "sampler); resume it with that version or start the run again"
            )
        self.sampler.load_state_dict(state)
        self._check(epoch, cursor)

    def state(self) -> dict:
        return dict(self.sampler.state_dict())

    def epoch_sampler(self, epoch: int, cursor: int):
        """The sampler to hand the DataLoader for ``epoch``, starting at ``cursor``."""
        self.sampler.set_epoch(epoch)
        self._check(epoch, cursor)
        return self.sampler

    def advance(self, samples: int, epoch_done: bool, next_epoch: int) -> None:
        self.sampler.advance(samples)
        if epoch_done:
            self.sampler.set_epoch(next_epoch)

    def _check(self, epoch: int, cursor: int) -> None:
        st = self.sampler.state_dict()
        if (st["epoch"], st["cursor"]) != (epoch, cursor):
            raise ValueError(
                f"sampler is at (epoch {st['epoch']}, cursor {st['cursor']}) but the trainer "
                f"at (epoch {epoch}, cursor {cursor}); hand the trainer a fresh sampler"
            )


def make_loader(
    dataset, sampler, collate_fn, batch_size: int, epoch: int, *, num_workers: int, seed: int, pin_memory: bool
) -> DataLoader:
    """Loader over ``sampler`` (from ``SamplerPosition.epoch_sampler``) for epoch ``epoch``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed * 1000 + epoch),
    )


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside (nested) dicts/lists/tuples to ``device``; other leaves unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def autocast_context(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_counts(batch: Mapping[str, Any], image_tokens: int) -> dict[str, int]:
    """Samples, images and LLM tokens (text positions + spliced image tokens) of one batch."""
    n = int(batch["input_ids"].shape[0])
    has_image = batch.get("has_image")
    images = int(torch.as_tensor(has_image).sum()) if has_image is not None else n
    mask = batch.get("attention_mask")
    text = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return {"samples": n, "images": images, "tokens": text + images * (image_tokens - 1)}


def accumulate_window(module, batches: Iterator, window: int, device, bf16: bool, image_tokens: int):
    """Forward/backward ``window`` micro-batches; returns (window-mean parts, summed counts).

    Gradients are all-reduced only on the last micro-batch (DDP ``no_sync`` / FSDP2)."""
    parts: dict[str, torch.Tensor] = {}
    counts = {"samples": 0, "images": 0, "tokens": 0}
    for i in range(window):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(
                f"the loader ran out after {i} of {window} micro-batches (does len(sampler) match what it yields?)"
            )
        batch = decode_batch_targets(to_device(batch, device))  # encoded targets: dequantised here
        for k, v in batch_counts(batch, image_tokens).items():
            counts[k] += v
        with grad_sync(module, i == window - 1), autocast_context(device, bf16):
            out = module(batch)
            (out["loss"] / window).backward()
        for k, v in out.items():
            parts[k] = parts.get(k, 0.0) + v.detach().float() / window
    return parts, counts


def optimizer_step(optimizer, scheduler, params, max_grad_norm: float) -> tuple[torch.Tensor, float]:
    """Clip, step optimizer and schedule, zero grads; returns (grad norm, lr used)."""
    norm = clip_gradients(params, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, lr


class StepTimer:
    """Wall time of one optimizer step (synchronising CUDA so the time is real)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start = device, time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return max(elapsed, 1e-9)
