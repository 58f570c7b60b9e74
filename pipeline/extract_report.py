"""The outcome of an extraction run: the report (JSON), its progress bar and its summary lines.

Both runners (in-process and Ray) record shards through ``ShardTracker``, so a run reports the
same fields, progress and summary whichever ran it. The report is written into the cache
(``_reports/extract-<time>.json``) and, if asked, to ``ExtractConfig.report``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cache.store import Location
from pipeline.extract_config import ExtractConfig


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
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.shards_failed

    def to_dict(self) -> dict:
        images = sum(s["images"] for s in self.shards_done.values())
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
            "images_per_second": round(images / self.seconds, 3) if self.seconds else None,
            "worker_restarts": self.worker_restarts,
            "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
            "per_shard": {str(k): v for k, v in sorted(self.shards_done.items())},
        }


class ShardTracker:
    """Records finished/failed shards into a report and drives the progress bar."""

    def __init__(self, report: ExtractReport, todo: list[int], images: int, num_shards: int, progress: bool):
        self.report, self.todo, self.num_shards = report, todo, num_shards
        self.bar = tqdm(total=images, desc="extract", unit="img", disable=not progress)
        self.t_start = time.perf_counter()

    def done(self, shard: int, summary: dict) -> None:
        r = self.report
        r.shards_done[shard] = summary
        r.failed_images.update(summary["failed"])
        if shard < self.num_shards:
            self.bar.update(summary["images"])
        images = sum(s["images"] for s in r.shards_done.values())
        self.bar.set_postfix(
            shards=f"{len(r.shards_done)}/{len(self.todo)}",
            failed=len(r.failed_images),
            img_s=f"{images / max(time.perf_counter() - self.t_start, 1e-9):.1f}",
        )

    def failed(self, shard: int, reason: str) -> None:
        self.report.shards_failed[shard] = reason

    def close(self) -> None:
        self.bar.close()


def write_report(cfg: ExtractConfig, report: ExtractReport) -> None:
    doc = json.dumps(report.to_dict(), indent=2).encode()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Location(cfg.out).write_atomic(f"_reports/extract-{stamp}.json", doc)
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_bytes(doc)


def summarize(report: ExtractReport) -> str:
    """A few lines a person reads at the end of a run."""
    d = report.to_dict()
    lines = [
        f"cache: {d['cache']}",
        f"shards: {len(d['shards_done'])} written, {len(d['shards_skipped'])} already committed, "
        f"{len(d['shards_failed'])} failed (of {d['shards_total']} incl. the no-image row)",
        f"images: {d['images_processed']} processed, {len(d['images_failed'])} failed, "
        f"{d['images_per_second']} img/s over {d['seconds']} s, worker restarts: {d['worker_restarts']}",
    ]
    for key, why in list(d["images_failed"].items())[:10]:
        lines.append(f"  failed image {key}: {why}")
    for shard, why in d["shards_failed"].items():
        lines.append(f"  FAILED shard {shard}: {why}")
    if d["stage_seconds"]:
        lines.append(
            "time per stage (s, summed over workers): "
            + ", ".join(f"{k}={v:.2f}" for k, v in sorted(d["stage_seconds"].items()))
        )
    return "\n".join(lines)
