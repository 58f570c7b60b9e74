"""Extraction's public surface: plan a run, then run it in-process or on Ray over the same plan.

    from pipeline.extract import extract_in_process, plan, run_extraction
    report = run_extraction(cfg)             # Ray: one actor per GPU (or N CPU actors)
    report = extract_in_process(cfg)         # this process, no Ray (tests, notebooks, debugging)
    p = plan(cfg, extractor.describe())      # the manifest and the shards still to do

Decisions:
- Work unit = one input shard -> the cache shard with the same index (plus the reserved no-image
  row as shard ``num_shards``). Resume state lives in the cache itself: committed shards are
  skipped, so a rerun after any crash only does what is missing. A job is idempotent.
- ``plan`` (``pipeline.extract_plan``) builds the manifest from the loaded teachers, creates or
  checks the cache before any shard runs, and lists the shards to do. Both runners start from
  it, so they write identical caches.
- Every shard is tried ``1 + max_shard_retries`` times, with an exponential, capped delay between
  attempts; a shard that keeps failing is reported and the run ends non-zero without losing the
  shards that did commit. A full disk stops the run at once (every next write would fail too):
  the report says so and the CLI prints one line with the path and the free space.
- Shards are claimed before they run (``pipeline.extract_queue``, ``cache.claims``), so two
  drivers on one cache share the work instead of both doing it; ``repair`` re-extracts exactly the
  shards ``verify`` finds damaged.
- ``describe_extraction`` (``movekd extract --dry-run``) prints the same plan from teacher
  metadata alone (``pipeline.teachers.describe_teacher``): no weights are loaded.
"""

from __future__ import annotations

import logging
import time

from cache.diskfull import is_disk_full
from cache.load_report import LOAD_NOTES
from pipeline.extract_config import ExtractConfig
from pipeline.extract_plan import ExtractPlan, build_manifest, check_inputs, plan
from pipeline.extract_queue import ShardQueue
from pipeline.extract_ray import run_on_ray
from pipeline.extract_report import ExtractReport, ShardTracker, summarize, write_report

log = logging.getLogger(__name__)

__all__ = [
    "ExtractPlan",
    "ExtractReport",
    "build_manifest",
    "extract_in_process",
    "plan",
    "run_extraction",
    "summarize",
]


def extract_in_process(cfg: ExtractConfig, extractor=None, repair: bool = False) -> ExtractReport:
    """Run (or resume) ``cfg`` in this process, shard after shard; returns the report.

    ``extractor`` is a ``ShardExtractor`` for ``cfg`` whose teachers are already loaded (optional;
    reusing one saves loading the teachers again). ``repair``: also re-extract damaged shards."""
    from pipeline.extract_worker import ShardExtractor

    t0 = time.perf_counter()
    packed = check_inputs(cfg)  # before loading any teacher
    extractor = extractor or ShardExtractor(cfg)
    for note in extractor.load_notes():
        logging.getLogger(LOAD_NOTES).info(note)
    p = plan(cfg, extractor.describe(), packed, repair=repair)
    extractor.bind(p.manifest)
    report = p.new_report()
    tracker = ShardTracker(report, list(p.todo), p.images_todo, p.manifest.num_shards, cfg.progress)
    queue = ShardQueue(p, cfg, tracker)
    try:
        while not queue.empty:
            shard = queue.next()
            if shard is None:
                time.sleep(queue.wait_s())
                continue
            _process_once(extractor, shard, queue, tracker)
    finally:
        queue.close()
        tracker.close()
    report.seconds = time.perf_counter() - t0
    write_report(cfg, report)
    return report


def _process_once(extractor, shard: int, queue: ShardQueue, tracker: ShardTracker) -> None:
    try:
        summary = extractor.process(shard, queue.replace(shard))
    except Exception as e:  # noqa: BLE001 - a failing shard is reported, the others still run
        reason = f"error: {type(e).__name__}: {str(e).strip()[:300]}"
        log.warning("shard %d attempt %d failed (%s)", shard, queue.attempts.get(shard, 0) + 1, reason)
        if is_disk_full(e):
            queue.disk_full(shard, e)
        elif not queue.retry(shard):
            tracker.failed(shard, reason)
        return
    queue.finish(shard)
    tracker.done(shard, summary)


def run_extraction(cfg: ExtractConfig, repair: bool = False) -> ExtractReport:
    """Run (or resume) ``cfg`` on Ray (``pipeline.extract_ray``); returns the report."""
    return run_on_ray(cfg, repair=repair)
