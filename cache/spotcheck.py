"""Comparing a cache with a fresh run of its teachers: the numbers of ``movekd cache verify --recompute``.

The teacher side (rebuilding the teachers, running them) is ``pipeline.recompute``; this module is
the format side, numpy only: which stored rows to sample, what is compared with what, the bound
each array is held to, and the report.

Decisions:
- What is compared: per sampled image and teacher, the decoded stored row with the fresh teacher
  output *encoded with the cache's codec and decoded again*, i.e. what an extraction would store
  now. The aux arrays (float32, stored exactly) are compared with the fresh float32 rows.
- Metric: relative MSE per image, ``sum((stored - fresh)^2) / sum(fresh^2)`` in float64, the
  quantity of each codec's ``rel_mse_bound`` (FORMAT.md section 5); the aux arrays are held to
  ``AUX_REL_MSE_BOUND``. The worst image per array is reported, with how many images exceeded the
  bound and how many were bit-identical.
- Why a codec's own bound is the threshold: a faithful recompute on the same device and dtype
  stores the same bytes (``identical``); compute noise (another batch composition, other
  kernels) changes an encoding only where a value sits at a rounding boundary, far below the
  codec's error. On the tiny test teachers a wrong checkpoint gives a rel. MSE of 2.6 and a
  bilinear instead of a bicubic resize 6x the int8 and 37x the bf16 bound. ``tolerance`` (added
  to every bound) is for recomputing a bf16 cache on other hardware, where bf16 rounding noise is
  expected to be of the order of those bounds.
- The no-image row is checked in addition to the N sampled images (one forward pass), because it
  is the row a wrong ``null_input`` breaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cache.codecs import get_codec
from cache.marker import NULL_KEY
from cache.reader import FeatureCache
from cache.text import table

# The aux arrays (aux/cls_state, aux/cls_attn) are stored as float32, exactly: their bound only
# allows for float32 compute noise between the extraction and the recompute (other batch sizes
# or thread counts can change a summation order). It equals the tightest codec bound (fp16's).
AUX_CODEC = "float32"
AUX_REL_MSE_BOUND = 1e-6


def rel_mse_rows(stored: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """Per row (image): ``sum((stored - fresh)^2) / sum(fresh^2)``, float64; 0 when both are all
    zero, inf when only the fresh row is."""
    a = np.asarray(stored, np.float64).reshape(len(stored), -1)
    b = np.asarray(fresh, np.float64).reshape(len(fresh), -1)
    if a.shape != b.shape:
        raise ValueError(f"stored rows {a.shape} and recomputed rows {b.shape} differ in shape")
    num, den = ((a - b) ** 2).sum(axis=1), (b**2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def bound_of(codec: str) -> float:
    """The documented rel. MSE bound of a codec preset, or of the float32 aux arrays."""
    return AUX_REL_MSE_BOUND if codec == AUX_CODEC else get_codec(codec).rel_mse_bound


def sample_keys(cache: FeatureCache, n: int, seed: int, skip_shards: Iterable[int] = ()) -> list[str]:
    """``n`` random valid image keys of the committed data shards (fewer if the cache has fewer),
    by ``seed``, in row order; shards in ``skip_shards`` (damaged ones) are left out."""
    skip = set(skip_shards)
    shards = [s for s in cache.committed_shards if s not in skip]
    valid = [k for s in shards for k in cache.commits[s].keys if cache.is_valid(k)]
    if n <= 0 or not valid:
        return []
    picked = np.random.default_rng(seed).choice(len(valid), size=min(n, len(valid)), replace=False)
    return [valid[i] for i in sorted(picked.tolist())]


@dataclass
class ArrayCheck:
    """The comparison of one teacher's features (or one aux array) over the sampled images."""

    name: str  # teacher name, or aux/cls_state, aux/cls_attn
    codec: str  # codec preset, or "float32" for the aux arrays
    bound: float  # the codec's bound plus the tolerance
    images: int = 0
    identical: int = 0  # images whose fresh encoding equals the stored bytes
    over: int = 0  # images over the bound
    worst_key: str | None = None
    worst_error: float = 0.0
    worst_max_abs: float = 0.0  # max |stored - fresh| of the worst image
    skipped: str | None = None  # why this array was not compared

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.worst_error <= self.bound

    def add(self, keys: Sequence[str], stored: np.ndarray, fresh: np.ndarray, identical: np.ndarray) -> None:
        errors = rel_mse_rows(stored, fresh)
        self.images += len(keys)
        self.identical += int(np.count_nonzero(identical))
        self.over += int(np.count_nonzero(errors > self.bound))
        if len(keys) and (self.worst_key is None or errors.max() > self.worst_error):
            i = int(errors.argmax())
            self.worst_key, self.worst_error = keys[i], float(errors[i])
            diff = np.abs(np.asarray(stored[i], np.float64) - np.asarray(fresh[i], np.float64))
            self.worst_max_abs = float(diff.max(initial=0.0))

    def to_dict(self) -> dict:
        return {
            "array": self.name,
            "codec": self.codec,
            "bound": self.bound,
            "images": self.images,
            "identical": self.identical,
            "over_bound": self.over,
            "worst_key": self.worst_key,
            "worst_rel_mse": self.worst_error,
            "worst_max_abs": self.worst_max_abs,
            "skipped": self.skipped,
            "ok": self.ok,
        }


@dataclass
class RecomputeReport:
    """What ``movekd cache verify --recompute N`` found; ``ok`` when every compared array is within
    its bound and nothing else (weights, pack, config) was found wrong."""

    location: str
    config: str  # where the teachers came from
    packed: str
    device: str
    seed: int
    tolerance: float
    keys: list[str] = field(default_factory=list)  # the images recomputed (NULL_KEY included)
    checks: list[ArrayCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, name: str) -> ArrayCheck:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        return {
            "location": self.location,
            "ok": self.ok,
            "config": self.config,
            "packed": self.packed,
            "device": self.device,
            "seed": self.seed,
            "tolerance": self.tolerance,
            "keys": self.keys,
            "checks": [c.to_dict() for c in self.checks],
            "problems": self.problems,
            "notes": self.notes,
        }

    def format(self) -> str:
        images = [k for k in self.keys if k != NULL_KEY]
        null = " + the no-image row" if NULL_KEY in self.keys else ""
        head = (
            f"recompute: {len(images)} image(s){null} (seed {self.seed}) re-run on {self.device}; "
            f"teachers from {self.config}; images from {self.packed}"
        )
        rows = [
            [
                c.name,
                c.codec,
                f"{c.bound:.1e}",
                str(c.images),
                str(c.identical),
                str(c.worst_key) if c.worst_key is not None else "-",
                f"{c.worst_error:.2e}" if c.skipped is None else "-",
                f"{c.worst_max_abs:.2e}" if c.skipped is None else "-",
                "ok" if c.ok else ("SKIPPED" if c.skipped else "FAIL"),
            ]
            for c in self.checks
        ]
        headers = ["array", "codec", "bound", "images", "identical", "worst image", "rel. MSE", "max |diff|", "result"]
        lines = [head, table(headers, rows)] if rows else [head]
        lines += [f"PROBLEM {p}" for p in self.problems] + [f"NOTE {n}" for n in self.notes]
        failed = [c.name for c in self.checks if not c.ok]
        if self.ok:
            lines.append(f"recompute OK: every array within its bound over {len(self.keys)} row(s)")
        else:
            what = f"{len(failed)} array(s) over their bound or not compared" if failed else "see the problems above"
            lines.append(f"recompute FAILED: {what}; {len(self.problems)} problem(s)")
        return "\n".join(lines)
