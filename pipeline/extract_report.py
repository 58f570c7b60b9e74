"""The outcome of an extraction run: the report (JSON), its progress bar and its summary lines.

Both runners (in-process and Ray) record shards through ``ShardTracker``, so a run reports the
same fields, progress and summary whichever ran it. The report is written into the cache
(``_reports/extract-<time>.json``) and, if asked, to ``ExtractConfig.report``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cache.diskfull import DiskFullError, disk_full_as_error
from cache.store import Location
from pipeline.extract_config import ExtractConfig

log = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    """The machine-readable outcome of a run (also written as JSON)."""

    cache: str
    shards_total: int
    shards_skipped: list[int] = field(default_factory=list)
    shards_done: dict[int, dict] = field(default_factory=dict)
    shards_failed: dict[int, str] = field(default_factory=dict)
    failed_images: dict[str, str] = field(default_factory=dict)
    worker_restarts: int = 0
    seconds: float = 0.0  # the whole run: start-up (Ray, teacher loading), shards, report
    extract_seconds: float = 0.0  # from the first shard handed out to the last one finished
    shards_by_others: dict[int, str] = field(default_factory=dict)  # committed by another driver meanwhile
    shards_damaged: dict[int, str] = field(default_factory=dict)  # found damaged, not repaired (no --repair)
    shards_repaired: list[int] = field(default_factory=list)  # damaged shards this run re-extracts
    stopped: str | None = None  # why the run stopped before its plan was done (a full disk)

    @property
    def ok(self) -> bool:
        return not self.shards_failed and not self.shards_damaged and self.stopped is None

    @property
    def null_shard(self) -> int:
        """The reserved no-image row's shard (after the data shards)."""
        return self.shards_total - 1

    def no_image_row(self) -> str:
        """What happened to the no-image row in this run, in words."""
        n = self.null_shard
        for done, words in (
            (n in self.shards_done, "written"),
            (n in self.shards_skipped, "already committed"),
            (n in self.shards_by_others, "committed by another driver"),
            (n in self.shards_failed, "FAILED"),
            (n in self.shards_damaged, "DAMAGED"),
        ):
            if done:
                return words
        return "not written (the run stopped first)"

    def to_dict(self) -> dict:
        # images = the data shards' rows; the no-image row (one row, no image) is reported apart
        images = sum(s["images"] for k, s in self.shards_done.items() if k != self.null_shard)
        stages: dict[str, float] = {}
        for s in self.shards_done.values():
            for k, v in s["stage_seconds"].items():
                stages[k] = stages.get(k, 0.0) + v
        return {
            "cache": self.cache,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "shards_total": self.shards_total,
            "shards_skipped": self.shards_skipped,
            "shards_done": sorted(self.shards_done),
            "shards_failed": {str(k): v for k, v in self.shards_failed.items()},
            "images_processed": images,
            "images_failed": self.failed_images,
            "extract_seconds": round(self.extract_seconds, 3),
            "images_per_second": round(images / self.extract_seconds, 3) if self.extract_seconds else None,
            "no_image_row": self.no_image_row(),
            "worker_restarts": self.worker_restarts,
            "shards_by_other_drivers": {str(k): v for k, v in sorted(self.shards_by_others.items())},
            "shards_damaged": {str(k): v for k, v in sorted(self.shards_damaged.items())},
            "shards_repaired": sorted(self.shards_repaired),
            "stopped": self.stopped,
            "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
            "per_shard": {str(k): v for k, v in sorted(self.shards_done.items())},
        }


def format_rate(images: int, seconds: float) -> str:
    """A rate a person reads at any speed: ``2.50 img/s``, or ``25.0 s/img`` below 1 img/s (at
    real size one image through every teacher can take seconds; ``0.0 img/s`` says nothing)."""
    if images <= 0 or seconds <= 0:
        return "-"
    rate = images / seconds
    if rate < 1:
        return f"{seconds / images:.1f} s/img"
    return f"{rate:.2f} img/s" if rate < 100 else f"{rate:.0f} img/s"


# tqdm's own rate is left out: ours (the run's mean, images only) is the one postfix field
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class ShardTracker:
    """Records finished/failed shards into a report and drives the progress bar.

    The bar counts the images of the data shards to do plus, when it is to do, the no-image row
    (one step, so 100 % means the run is done); its rate counts images only."""

    def __init__(self, report: ExtractReport, todo: list[int], images: int, num_shards: int, progress: bool):
        self.report, self.todo, self.num_shards = report, todo, num_shards
        null = num_shards in todo
        desc = "extract (+ no-image row)" if null else "extract"
        self.bar = tqdm(total=images + null, desc=desc, unit="img", bar_format=BAR_FORMAT, disable=not progress)
        self.t_start = time.perf_counter()

    def done(self, shard: int, summary: dict) -> None:
        if "by_other" in summary:
            self.by_other(shard, summary["by_other"])
            return
        r = self.report
        r.shards_done[shard] = summary
        r.failed_images.update(summary["failed"])
        self.bar.update(summary["images"] if shard < self.num_shards else 1)
        images = sum(s["images"] for k, s in r.shards_done.items() if k < self.num_shards)
        self.bar.set_postfix(
            shards=f"{len(r.shards_done)}/{len(self.todo)}",
            failed=len(r.failed_images),
            rate=format_rate(images, time.perf_counter() - self.t_start),
        )

    def failed(self, shard: int, reason: str) -> None:
        self.report.shards_failed[shard] = reason

    def by_other(self, shard: int, why: str) -> None:
        """``shard`` was committed by another driver: nothing to do here."""
        self.report.shards_by_others[shard] = why

    def close(self) -> None:
        self.report.extract_seconds = time.perf_counter() - self.t_start
        self.bar.close()


def write_report(cfg: ExtractConfig, report: ExtractReport) -> None:
    """The report into the cache and, if asked, to ``cfg.report``; on a full disk a warning (the
    summary is still printed, and the run already ends non-zero)."""
    doc = json.dumps(report.to_dict(), indent=2).encode()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rel = f"_reports/extract-{stamp}.json"
    targets = [(f"{cfg.out}/{rel}", lambda: Location(cfg.out).write_atomic(rel, doc))]
    if cfg.report:
        targets.append((cfg.report, lambda: _write_file(cfg.report, doc)))
    for where, write in targets:
        try:
            with disk_full_as_error(where):
                write()
        except DiskFullError as e:
            log.warning("the run report was not written: %s", e)


def _write_file(path: str, doc: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(doc)


def summarize(report: ExtractReport, repair_command: str | None = None) -> str:
    """A few lines a person reads at the end of a run. ``repair_command`` is the command that
    re-extracts damaged shards (the CLI passes its own ``--config``)."""
    d = report.to_dict()
    repair = repair_command or "movekd extract --config CONFIG --repair"
    lines = [
        f"cache: {d['cache']}",
        f"shards: {len(d['shards_done'])} written, {len(d['shards_skipped'])} already committed, "
        f"{len(d['shards_failed'])} failed (of {d['shards_total']} incl. the no-image row)",
        f"images: {d['images_processed']} processed, {len(d['images_failed'])} failed, "
        f"{format_rate(d['images_processed'], report.extract_seconds)} over {d['extract_seconds']} s "
        f"({d['seconds']} s with start-up), worker restarts: {d['worker_restarts']}",
        f"no-image row (the black input of text-only rows): {d['no_image_row']}",
    ]
    if d["shards_by_other_drivers"]:
        owners = sorted(set(d["shards_by_other_drivers"].values()))
        n = len(d["shards_by_other_drivers"])
        lines.append(f"  {n} shards were committed by another driver: {', '.join(owners)}")
    if d["shards_repaired"]:
        lines.append(f"  repaired (re-extracted) damaged shards: {d['shards_repaired']}")
    for key, why in list(d["images_failed"].items())[:10]:
        lines.append(f"  failed image {key}: {why}")
    for shard, why in d["shards_failed"].items():
        lines.append(f"  FAILED shard {shard}: {why}")
    for shard, why in d["shards_damaged"].items():
        lines.append(f"  DAMAGED shard {shard} (not counted as committed): {why}")
    if d["shards_damaged"]:
        lines.append(f"  re-extract the damaged shards (and only those) with: {repair}")
    if d["stopped"]:
        lines.append(f"  STOPPED: {d['stopped']}")
    if d["stage_seconds"]:
        lines.append(
            "time per stage (s, summed over workers): "
            + ", ".join(f"{k}={v:.2f}" for k, v in sorted(d["stage_seconds"].items()))
        )
    return "\n".join(lines)
