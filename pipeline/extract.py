"""The extraction driver: plan shards, run Ray actors over them, retry, report.

Decisions:
- Work unit = one input shard -> the cache shard with the same index (plus the reserved no-image
  row as shard ``num_shards``). Resume state lives in the cache itself: committed shards are
  skipped, so a rerun after any crash only does what is missing. A job is idempotent.
- The manifest is built from the first actor's loaded teachers (fingerprints, grids) and checked
  against an existing cache *before* any shard is processed: resuming with a different teacher
  set, codec or preprocessing is refused with the differing fields named.
- One actor per GPU (or N CPU actors), each loading all teachers once and pulling one shard at a
  time. An actor that dies is replaced and its shard retried (bounded); a shard that keeps failing
  is reported and the job ends non-zero without losing the shards that did commit.
- Ray runs embedded (a local cluster bound to 127.0.0.1) unless ``ray_address`` names a cluster
  (the CLI sets ``auto`` when started by ``ray job submit``, which exports RAY_ADDRESS).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cache.manifest import CacheManifest, TeacherEntry
from cache.store import Location
from cache.writer import CacheWriter
from pipeline.extract_config import ExtractConfig
from pipeline.packed_dataset import PackedDataset

log = logging.getLogger(__name__)

# Every Ray worker process is an entry point: it makes torchvision importable (``movekd_compat``)
# before any actor imports timm or transformers.
WORKER_RUNTIME_ENV = {"worker_process_setup_hook": "movekd_compat.ensure_torchvision_importable"}


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


def _loopback_only() -> None:
    """Keep an embedded cluster on 127.0.0.1. Ray swaps a loopback node address for the machine's
    routable IP (``services.resolve_ip_for_localhost``) unless multi-node clusters are disabled,
    as it does on macOS/Windows. The variable reaches the GCS, raylet and workers it spawns; the
    constant covers this process when ray was imported before."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(cfg: ExtractConfig) -> None:
    local = cfg.ray_address in (None, "", "local")
    if local:
        _loopback_only()
    import ray

    if ray.is_initialized():
        return
    if local:
        # An embedded single-node cluster, bound to loopback, gone when this process ends.
        ray.init(
            address="local",
            num_cpus=cfg.ray_num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            runtime_env=WORKER_RUNTIME_ENV,
        )
    else:
        # "auto" (what `ray job submit` sets up) or "ray://host:port" / "host:port"; merged with
        # the job's own runtime_env.
        ray.init(address=cfg.ray_address, configure_logging=False, runtime_env=WORKER_RUNTIME_ENV)


def run_extraction(cfg: ExtractConfig) -> ExtractReport:
    """Run (or resume) an extraction; returns the report (``report.ok`` tells success)."""
    import ray

    t0 = time.perf_counter()
    packed = PackedDataset(cfg.packed)
    init_ray(cfg)
    pool = _ActorPool(cfg)
    try:
        manifest = _manifest(cfg, packed, ray.get(pool.actors[0].describe.remote()))
        writer = CacheWriter.create(cfg.out, manifest)
        done = writer.committed_shards()
        todo = [s for s in range(manifest.num_shards + 1) if s not in done]
        report = ExtractReport(Location(cfg.out).url, manifest.num_shards + 1, sorted(done))
        log.info("cache %s: %d of %d shards committed, %d to do", cfg.out, len(done), report.shards_total, len(todo))
        _run_shards(pool, manifest, todo, packed, report, cfg)
    finally:
        pool.shutdown()
    report.seconds = time.perf_counter() - t0
    _write_report(cfg, report)
    return report


def _manifest(cfg: ExtractConfig, packed: PackedDataset, entries: list[dict]) -> CacheManifest:
    return CacheManifest(
        teachers=tuple(TeacherEntry.from_dict(e) for e in entries),
        num_shards=packed.num_shards,
        shard_size=packed.shard_size,
        dataset_fingerprint=packed.fingerprint,
        dataset_name=cfg.dataset_name,
        cls_teacher=cfg.cls_teacher,
        notes={"extract_config": cfg.to_dict()},
    )


class _ActorPool:
    """The worker actors, with replacement of dead ones."""

    def __init__(self, cfg: ExtractConfig):
        import ray

        from pipeline.extract_worker import ShardExtractor, resolve_device

        gpu = resolve_device(cfg.device) == "cuda"
        opts = {"num_gpus": cfg.gpus_per_worker, "num_cpus": 1} if gpu else {"num_cpus": cfg.cpus_per_worker}
        self._cls = ray.remote(ShardExtractor).options(max_restarts=0, **opts)
        self._threads = None if gpu else max(1, int(cfg.cpus_per_worker))
        self.cfg = cfg
        self.actors = [self._new(i) for i in range(cfg.num_workers)]
        self.restarts = 0

    def _new(self, worker_id: int):
        return self._cls.remote(self.cfg, worker_id, self._threads)

    def replace(self, index: int) -> None:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new(index)
        self.restarts += 1

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)


def _run_shards(
    pool: _ActorPool,
    manifest: CacheManifest,
    todo: list[int],
    packed: PackedDataset,
    report: ExtractReport,
    cfg: ExtractConfig,
) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    queue, attempts = deque(todo), {s: 0 for s in todo}
    total_images = sum(len(packed.keys_in_shard(s)) for s in todo if s < manifest.num_shards)
    bar = tqdm(total=total_images, desc="extract", unit="img", disable=not cfg.progress)
    running: dict = {}  # ObjectRef -> (actor index, shard)
    mdict = manifest.to_dict()
    idle = list(range(len(pool.actors)))
    t_start = time.perf_counter()
    while queue or running:
        while queue and idle:
            i, shard = idle.pop(), queue.popleft()
            running[pool.actors[i].process.remote(shard, mdict)] = (i, shard)
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        i, shard = running.pop(ref)
        try:
            summary = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            died = isinstance(e, RayActorError)
            attempts[shard] += 1
            reason = f"{'worker died' if died else 'error'}: {str(e).strip().splitlines()[-1][:300]}"
            log.warning("shard %d attempt %d failed (%s)", shard, attempts[shard], reason)
            if died:
                pool.replace(i)
            if attempts[shard] <= cfg.max_shard_retries:
                queue.append(shard)
            else:
                report.shards_failed[shard] = reason
            idle.append(i)
            continue
        idle.append(i)
        report.shards_done[shard] = summary
        report.failed_images.update(summary["failed"])
        if shard < manifest.num_shards:
            bar.update(summary["images"])
        done_imgs = sum(s["images"] for s in report.shards_done.values())
        bar.set_postfix(
            shards=f"{len(report.shards_done)}/{len(todo)}",
            failed=len(report.failed_images),
            img_s=f"{done_imgs / max(time.perf_counter() - t_start, 1e-9):.1f}",
        )
    bar.close()
    report.worker_restarts = pool.restarts


def _write_report(cfg: ExtractConfig, report: ExtractReport) -> None:
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
