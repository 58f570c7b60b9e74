"""The Ray runner of an extraction plan: one actor per GPU (or N CPU actors), retries, dead workers.

Decisions:
- One actor per GPU (or ``num_workers`` CPU actors), each loading all teachers once and pulling
  one shard at a time. The plan (``pipeline.extract_plan.plan``) is made from the first actor's loaded
  teachers; its manifest is shipped to each actor ONCE (``ShardExtractor.bind``), not with every
  shard. Actor calls run in submission order, so a replacement actor is bound before its first
  shard.
- An actor that dies is replaced and its shard retried (bounded by ``max_shard_retries``, after
  an exponential, capped delay); a shard that keeps failing is reported and the job ends non-zero
  without losing committed shards. A full disk stops handing out shards (``ShardQueue.disk_full``).
- Shards are claimed before they are handed out (``pipeline.extract_queue``): a second driver on
  the same cache leaves them alone.
- Ray runs embedded (a local cluster bound to 127.0.0.1) unless ``ray_address`` names a cluster
  (the CLI sets ``auto`` when started by ``ray job submit``, which exports RAY_ADDRESS).
- Every Ray worker process runs ``movekd_compat.ensure_torchvision_importable`` before any actor
  (``worker_process_setup_hook``): workers are entry points like the CLI.
- Feature tensors never travel through Ray's object store: each actor writes its own shards and
  returns a small summary.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from cache.diskfull import is_disk_full
from cache.load_report import LOAD_NOTES
from pipeline.extract_config import ExtractConfig
from pipeline.extract_plan import ExtractPlan, check_inputs, plan
from pipeline.extract_queue import ShardQueue
from pipeline.extract_report import ExtractReport, ShardTracker, write_report

log = logging.getLogger(__name__)

WORKER_RUNTIME_ENV = {"worker_process_setup_hook": "movekd_compat.ensure_torchvision_importable"}


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


def run_on_ray(cfg: ExtractConfig, repair: bool = False) -> ExtractReport:
    """Run (or resume) an extraction on Ray; returns the report (``report.ok`` tells success)."""
    import ray

    t0 = time.perf_counter()
    packed = check_inputs(cfg)  # before starting Ray or loading any teacher
    init_ray(cfg)
    check_cluster(cfg)  # before loading any teacher: unplaceable workers would wait forever
    pool = _ActorPool(cfg)
    try:
        for note in ray.get(pool.actors[0].load_notes.remote()):  # every actor loaded the same: say it once
            logging.getLogger(LOAD_NOTES).info(note)
        p = plan(cfg, ray.get(pool.actors[0].describe.remote()), packed, repair=repair)
        pool.bind(p.manifest.to_dict())
        report = p.new_report()
        _run_shards(pool, p, report, cfg)
    finally:
        pool.shutdown()
    report.seconds = time.perf_counter() - t0
    write_report(cfg, report)
    return report


def worker_resources(cfg: ExtractConfig) -> dict[str, float]:
    """What one extraction actor asks Ray for."""
    from pipeline.extract_worker import resolve_device

    if resolve_device(cfg.device) == "cuda":
        return {"GPU": float(cfg.gpus_per_worker), "CPU": 1.0}
    return {"CPU": float(cfg.cpus_per_worker)}


def check_cluster(cfg: ExtractConfig, have: dict | None = None) -> None:
    """Refuse, in one line, a run whose workers the cluster cannot place (Ray would queue them
    forever: "No available node types can fulfill resource request"). ``have`` defaults to
    ``ray.cluster_resources()``; autoscaling clusters are not waited for."""
    if have is None:
        import ray

        have = ray.cluster_resources()
    per = worker_resources(cfg)
    fits = min(int(have.get(k, 0.0) // v) if v > 0 else cfg.num_workers for k, v in per.items())
    if fits >= cfg.num_workers:
        return
    asked = ", ".join(f"{cfg.num_workers} x {v:g} {k}" for k, v in per.items())
    has = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in per)
    if fits == 0 and "GPU" in per:
        hint = "set device=cpu (or auto on a machine without GPUs), or run on a cluster with GPU nodes"
    elif fits == 0:
        hint = f"set cpus_per_worker <= {have.get('CPU', 0.0):g}"
    else:
        hint = f"set num_workers <= {fits}"
    raise ValueError(f"the Ray cluster cannot place the extraction workers: asked {asked}, it has {has}; {hint}")


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
        self.manifest: dict | None = None
        self.actors = [self._new(i) for i in range(cfg.num_workers)]
        self.restarts = 0
        self._wait_started()

    def _wait_started(self) -> None:
        """Every actor placed and its teachers loaded within ``worker_start_timeout_s``; else an
        error saying how many started and what the cluster has (never a silent wait)."""
        import ray

        refs = [a.__ray_ready__.remote() for a in self.actors]
        log.info("starting %d extraction worker(s) (placing them and loading the teachers)", len(refs))
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.worker_start_timeout_s)
        ray.get(ready)  # a worker whose teachers failed to load raises here, with its error
        if pending:
            self.shutdown()
            raise ValueError(
                f"{len(pending)} of {len(refs)} extraction workers did not start within "
                f"{self.cfg.worker_start_timeout_s:g} s (each asks {worker_resources(self.cfg)}; the cluster has "
                f"{ray.cluster_resources()}); free resources, lower num_workers, or raise worker_start_timeout_s"
            )

    def _new(self, worker_id: int):
        actor = self._cls.remote(self.cfg, worker_id, self._threads)
        if self.manifest is not None:
            actor.bind.remote(self.manifest)
        return actor

    def bind(self, manifest: dict) -> None:
        """Ship the manifest to every actor, once."""
        import ray

        self.manifest = manifest
        ray.get([a.bind.remote(manifest) for a in self.actors])

    def replace(self, index: int) -> None:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new(index)
        self.restarts += 1

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)


def _run_shards(pool: _ActorPool, p: ExtractPlan, report: ExtractReport, cfg: ExtractConfig) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    tracker = ShardTracker(report, list(p.todo), p.images_todo, p.manifest.num_shards, cfg.progress)
    queue = ShardQueue(p, cfg, tracker)
    running: dict = {}  # ObjectRef -> (actor index, shard)
    idle = list(range(len(pool.actors)))
    try:
        while not queue.empty or running:
            while idle and (shard := queue.next()) is not None:
                i = idle.pop()
                running[pool.actors[i].process.remote(shard, queue.replace(shard))] = (i, shard)
            if not running:
                time.sleep(queue.wait_s())
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=queue.wait_s() if not queue.empty else None)
            if not ready:
                continue
            i, shard = running.pop(ready[0])
            idle.append(i)
            try:
                summary = ray.get(ready[0])
            except (RayActorError, RayTaskError) as e:
                died = isinstance(e, RayActorError)
                reason = f"{'worker died' if died else 'error'}: {str(e).strip().splitlines()[-1][:300]}"
                log.warning("shard %d attempt %d failed (%s)", shard, queue.attempts.get(shard, 0) + 1, reason)
                if died:
                    pool.replace(i)
                cause = getattr(e, "cause", None)
                if is_disk_full(cause) or "No space left on device" in str(e):
                    queue.disk_full(shard, cause if is_disk_full(cause) else e)
                elif not queue.retry(shard):
                    tracker.failed(shard, reason)
                continue
            queue.finish(shard)
            tracker.done(shard, summary)
    finally:
        queue.close()
        tracker.close()
    report.worker_restarts = pool.restarts
