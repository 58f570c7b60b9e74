"""Training logs: per-step JSONL records, cross-rank metric reduction, loss-curve PNG.

Decisions:
- One JSON object per optimizer step (``log_every`` thins it), written by rank 0 and flushed per
  line, so a killed run keeps everything up to its last step. On resume the file is cut back to
  the checkpoint's step: the resumed run re-logs the steps it redoes, and the log then reads like
  one uninterrupted run.
- Loss parts are averaged over the accumulation window and over ranks (one all_reduce of a
  stacked vector); counts (samples, tokens, images) are summed over ranks.
- The plot is drawn with matplotlib's Agg backend (no display needed) from the JSONL file alone,
  so it can also be redrawn offline with ``plot_losses(log, png)``.
- A person follows a run either on the progress bar (a terminal) or, where the bar is not drawn
  (stderr is a pipe or a file, as under a scheduler, or ``progress_bar=false``), on plain log
  lines (``StepLines``), one every ``log_every`` steps: step, loss and its parts, lr, samples/s
  since the previous line, ETA from this run's mean step time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from student.distributed import DistContext

LOSS_KEYS = ("loss", "loss/text", "loss/balance", "loss/kd")


class JsonlLogger:
    """Append-only JSONL log (rank 0 only; other ranks get a no-op logger)."""

    def __init__(self, path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (work lost to an interruption, redone on resume)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: Mapping) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(record), sort_keys=False) + "\n")


class StepLines:
    """Plain progress lines of a run (``line(record)`` per logged step): what the bar shows, for a log.

    ``total`` and ``start`` are the run's last and first step (``start`` > 0 after a resume: the
    ETA counts only this process's steps); ``clock`` is for tests."""

    def __init__(self, total: int, start: int = 0, clock=time.perf_counter) -> None:
        self.total, self.start, self.clock = total, start, clock
        self.t0 = self.t_last = clock()
        self.samples = 0  # since the last line

    def line(self, record: Mapping) -> str:
        now, step = self.clock(), int(record["step"])
        window, self.t_last = max(now - self.t_last, 1e-9), now
        samples, self.samples = self.samples, 0
        done = max(step - self.start, 1)
        eta = (now - self.t0) / done * max(self.total - step, 0)
        parts = ", ".join(f"{k.split('/', 1)[1]} {record[k]:.4f}" for k in LOSS_KEYS[1:] if k in record)
        return (
            f"step {step}/{self.total} (epoch {record.get('epoch', 0)}): loss {record['loss']:.4f}"
            + (f" ({parts})" if parts else "")
            + f", lr {record['lr']:.2e}, {samples / window:.2f} samples/s, ETA {_clock_time(eta)}"
        )

    def count(self, record: Mapping) -> None:
        """Every step's samples (also the steps between lines), for the rate."""
        self.samples += int(record.get("samples", 0))


def _clock_time(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def reduce_metrics(
    ctx: DistContext, means: Mapping[str, torch.Tensor | float], sums: Mapping[str, torch.Tensor | float]
) -> dict[str, float]:
    """Rank-mean of ``means`` (floats) and rank-sum of ``sums`` (integer counts), with a single
    collective and host sync."""
    keys_m, keys_s = list(means), list(sums)
    values = [torch.as_tensor(means[k], dtype=torch.float64).reshape(()) for k in keys_m]
    values += [torch.as_tensor(sums[k], dtype=torch.float64).reshape(()) for k in keys_s]
    if not values:
        return {}
    vec = torch.stack([v.detach().to("cpu", torch.float64) for v in values])
    vec = ctx.sum_(vec.to(ctx.device) if ctx.device.type == "cuda" else vec).cpu()
    n = len(keys_m)
    out = {k: float(vec[i]) / ctx.world_size for i, k in enumerate(keys_m)}
    out.update({k: int(round(float(vec[n + i]))) for i, k in enumerate(keys_s)})
    return out


def _series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_losses(log_path, png_path) -> Path:
    """Loss curves (total and parts; per-teacher KD) from a JSONL training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    if not records:
        raise ValueError(f"{log_path} holds no records to plot")
    teachers = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("kd/")})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in LOSS_KEYS:
        steps, vals = _series(records, key)
        if steps:
            ax1.plot(steps, vals, label=key)
    for t in teachers:
        steps, vals = _series(records, f"kd/{t}")
        ax2.plot(steps, vals, label=f"kd/{t} (weighted)")
    ax1.set(title="losses", xlabel="optimizer step", yscale="log")
    ax2.set(title="KD per teacher", xlabel="optimizer step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
