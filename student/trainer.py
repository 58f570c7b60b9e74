"""``Trainer``: runs a ``DistillModel`` over a dataset with checkpoints, logs and exact resume.

Usage (the jobs layer builds every argument; see the end of this docstring)::

    model = build_student(cfg, manifest, compute_dtype=...)
    trainer = Trainer(cfg, model, dataset, collate_fn, sampler, rank=r, world_size=w, device=dev)
    state = trainer.train(resume=True)

Decisions:
- The trainer is handed everything (config, model, dataset, collate function, sampler, rank,
  world size, device); it reads no env vars and builds no data. The sampler is
  ``student.sampler.DistributedLengthGroupedSampler`` (cursor protocol) or any sampler whose
  order is a pure function of (epoch, rank, world size) after ``set_epoch`` (see
  ``student.train_loop.SamplerPosition``); hand it over fresh, the trainer sets its position.
- Exact resume: ``resume=True`` loads the latest complete checkpoint (weights, AdamW, schedule,
  RNG states, step, epoch, cursor) and re-creates the loader at that position; on CPU the
  continuation is bit-identical to the uninterrupted run (tested in a fresh process).
  ``resume=True`` with no checkpoint starts fresh; ``resume=False`` refuses an output dir that
  already holds checkpoints rather than silently interleaving two runs.
- Fresh runs seed python/numpy/torch with ``seed + rank`` (dropout differs per rank, as in
  DDP practice); model init is seeded separately by ``build_student``.
- Precision: bf16 autocast on CUDA (``cfg.bf16=None``), fp32 masters for trainable weights;
  frozen weights are stored in bf16 there (saves the stage-1 LLM's fp32 copy), except under
  FSDP (uniform dtypes). CPU runs are fp32 throughout.
- Checkpoints every ``save_every`` steps, when ``train(stop_after=N)`` stops early (preemption /
  tests) and at the end; the loss-curve PNG is drawn from the JSONL log when ``train`` returns.
- Progress (rank 0): a tqdm bar when ``progress_bar`` is on and stderr is a terminal; otherwise
  (a pipe, a log file, a scheduler) one plain log line every ``log_every`` steps
  (``student.logging_utils.StepLines``, logger ``student.trainer``), so a log shows the run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from student.checkpoint import (
    EXTENDABLE,
    TrainState,
    clean_partial,
    complete_checkpoints,
    extension_changes,
    find_latest,
    fingerprint,
    load_checkpoint,
    read_trainer_state,
    relay_schedule,
    save_checkpoint,
)
from student.config import TrainConfig
from student.distill_model import DistillModel
from student.distributed import DistContext, wrap_model
from student.logging_utils import JsonlLogger, StepLines, plot_losses, reduce_metrics
from student.model import cast_frozen_, student_geometry
from student.optim import build_optimizer, build_scheduler, total_steps
from student.train_loop import SamplerPosition, StepTimer, accumulate_window, make_loader, optimizer_step

LOG_NAME, PLOT_NAME = "train_log.jsonl", "loss_curves.png"
log = logging.getLogger(__name__)


def resolve_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.bf16 is None else bool(cfg.bf16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Training loop for one rank. ``model`` is an unwrapped ``DistillModel`` (any device)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: DistillModel,
        dataset,
        collate_fn,
        sampler,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        self.cfg, self.ctx = cfg, DistContext(rank, world_size, torch.device(device or "cpu"))
        self.bf16 = resolve_bf16(cfg, self.ctx.device)
        self.model = model.to(self.ctx.device)
        if self.bf16 and self.ctx.device.type == "cuda" and not (self.ctx.distributed and cfg.distributed == "fsdp"):
            cast_frozen_(self.model, torch.bfloat16)
        self.dataset, self.collate_fn, self.sampler = dataset, collate_fn, sampler
        self.position = SamplerPosition(sampler)
        self.fingerprint = fingerprint(cfg, self.model, world_size, self.position.samples_per_epoch())
        self.module = wrap_model(self.model, cfg, self.ctx, self.bf16)
        self.batches_per_epoch = math.ceil(self.position.samples_per_epoch() / cfg.batch_size)
        self.total_steps = total_steps(self.batches_per_epoch, cfg)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.out = Path(cfg.output_dir)
        self.log_path, self.plot_path = self.out / LOG_NAME, self.out / PLOT_NAME
        self.logger = JsonlLogger(self.log_path, enabled=self.ctx.is_main)
        self.image_tokens = student_geometry(self.model.llava)[1]
        self.state, self.last_saved = TrainState(), None
        self.extensions: list[dict] = []  # the run's --extend history, carried by every checkpoint
        self.lines: StepLines | None = None  # plain progress lines when no bar is drawn (set by train)

    # -- public ------------------------------------------------------------------------------------
    def train(self, resume: bool = False, stop_after: int | None = None, extend: bool = False) -> TrainState:
        """Train to ``total_steps`` (or stop after step ``stop_after``, with a checkpoint).

        ``extend=True`` (with ``resume``) continues a run, finished or not, whose ``max_steps`` or
        ``epochs`` were raised: everything else must match, the restored weights, optimizer, RNG and
        sampler position are exact, and the warmup + cosine schedule is re-laid over the new total
        (the lr at the resumed step is the new plan's; logged, and recorded in the checkpoints)."""
        if extend and not resume:
            raise ValueError("extend=True continues a checkpointed run: it needs resume=True")
        self._start(resume, extend)
        self.model.train()
        show_bar = self.cfg.progress_bar and self.ctx.is_main and _is_terminal(sys.stderr)
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=f"train {self.cfg.stage}",
            disable=not show_bar,
            dynamic_ncols=True,
        )
        self.lines = StepLines(self.total_steps, self.state.step) if self.ctx.is_main and not show_bar else None
        try:
            self._run(bar, stop_after)
        finally:
            bar.close()
        if self.last_saved != self.state.step:
            self.save()
        if self.cfg.plot and self.ctx.is_main and self.log_path.is_file() and self.log_path.stat().st_size:
            plot_losses(self.log_path, self.plot_path)
        return self.state

    def save(self) -> Path:
        path = save_checkpoint(
            self.out,
            self.state,
            self.model,
            self.optimizer,
            self.scheduler,
            self.fingerprint,
            self.cfg,
            rank=self.ctx.rank,
            barrier=self.ctx.barrier,
            sampler_state=self.position.state(),
            extensions=self.extensions,
        )
        self.last_saved = self.state.step
        return path

    # -- internals ----------------------------------------------------------------------------------
    def _start(self, resume: bool, extend: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            clean_partial(self.out)
        self.ctx.barrier()
        latest = find_latest(self.out) if resume else None
        if latest is None:
            if complete_checkpoints(self.out):
                raise ValueError(
                    f"{self.out} already holds checkpoints: pass resume=True to continue that run, "
                    "or choose a new output_dir"
                )
            seed_everything(self.cfg.seed + self.ctx.rank)
            self.position.reset()
            self.logger.reset()
            self.state, self.last_saved = TrainState(), None
            return
        meta = read_trainer_state(latest)
        changes = extension_changes(meta["fingerprint"], self.fingerprint) if extend else []
        if extend and self.total_steps <= meta["step"]:
            raise ValueError(
                f"--extend: nothing to extend: {latest} is at step {meta['step']} and this configuration plans "
                f"{self.total_steps} steps in all; raise max_steps (or epochs)"
            )
        self.state = load_checkpoint(
            latest,
            self.model,
            self.optimizer,
            self.scheduler,
            self.fingerprint,
            rank=self.ctx.rank,
            allow=EXTENDABLE if extend else (),
        )
        self.extensions = list(meta.get("extensions", []))
        if changes:
            self._extended(meta, changes)
        self.position.restore(meta.get("sampler"), self.state.epoch, self.state.cursor)
        self.last_saved = self.state.step
        self.logger.truncate_after(self.state.step)

    def _extended(self, meta: dict, changes: list) -> None:
        old_cfg = dataclasses.replace(self.cfg, **{f.split(".")[-1]: a for f, a, _ in changes})
        old_total = total_steps(self.batches_per_epoch, old_cfg)
        before = [g["lr"] for g in self.optimizer.param_groups]
        after = relay_schedule(self.scheduler)
        record = {
            "step": self.state.step,
            "total_steps": [old_total, self.total_steps],
            **{f.split(".")[-1]: [a, b] for f, a, b in changes},
        }
        self.extensions.append(record)
        if self.ctx.is_main:
            what = ", ".join(f"{f.split('.')[-1]} {a} -> {b}" for f, a, b in changes)
            log.info(
                "--extend: continuing %s at step %d: %s, %d -> %d steps in all; the warmup + cosine schedule is "
                "re-laid over %d steps (lr now %.4g, was %.4g on the old plan)",
                self.out,
                self.state.step,
                what,
                old_total,
                self.total_steps,
                self.total_steps,
                after[0],
                before[0],
            )

    def _run(self, bar, stop_after: int | None) -> None:
        cfg = self.cfg
        while self.state.step < self.total_steps:
            epoch, cursor = self.state.epoch, self.state.cursor
            if cursor % cfg.batch_size:
                raise ValueError(f"resume cursor {cursor} is not a multiple of batch_size {cfg.batch_size}")
            loader = make_loader(
                self.dataset,
                self.position.epoch_sampler(epoch, cursor),
                self.collate_fn,
                cfg.batch_size,
                epoch,
                num_workers=cfg.num_workers,
                seed=cfg.seed,
                pin_memory=self.ctx.device.type == "cuda",
            )
            batches, remaining = iter(loader), self.batches_per_epoch - cursor // cfg.batch_size
            timer = StepTimer(self.ctx.device)
            while remaining > 0 and self.state.step < self.total_steps:
                window = min(cfg.grad_accum, remaining)
                record, samples = self._step(batches, window, timer)
                remaining -= window
                self.position.advance(samples, remaining == 0, epoch + 1)
                s = self.state
                self.state = (
                    TrainState(s.step + 1, epoch + 1, 0)
                    if remaining == 0
                    else TrainState(s.step + 1, epoch, s.cursor + samples)
                )
                self._after_step(record, bar)
                if stop_after is not None and self.state.step >= stop_after:
                    return
            del batches, loader

    def _step(self, batches, window: int, timer: StepTimer) -> tuple[dict, int]:
        parts, counts = accumulate_window(self.module, batches, window, self.ctx.device, self.bf16, self.image_tokens)
        norm, lr = optimizer_step(self.optimizer, self.scheduler, self.params, self.cfg.max_grad_norm)
        elapsed = timer.lap()
        means = {**parts, **self.model.routing_stats(), "grad_norm": norm}
        reduced = reduce_metrics(self.ctx, means, counts)
        record = {
            "step": self.state.step + 1,
            "epoch": self.state.epoch,
            "lr": lr,
            **reduced,
            "tokens_per_s": reduced["tokens"] / elapsed,
            "images_per_s": reduced["images"] / elapsed,
            "step_time_s": elapsed,
        }
        return record, counts["samples"]

    def _after_step(self, record: dict, bar) -> None:
        step = self.state.step
        if self.lines is not None:
            self.lines.count(record)
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self.logger.write(record)
            if self.lines is not None:
                log.info(self.lines.line(record))
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        if step % self.cfg.save_every == 0:
            self.save()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
