"""The shards a driver hands out: claimed first, retried with backoff, others' shards waited for.

Both runners (in-process and Ray) take shards from a ``ShardQueue`` over their plan:

- ``next()`` returns a shard only once this driver holds its claim (``cache.claims``) and the
  shard is still uncommitted (another driver may have committed it since the plan was made); a
  shard claimed by a live driver is set aside, with one log line naming that driver, and looked
  at again later: committed -> counted as done by the other driver; claim gone or stale -> ours.
- ``retry(shard, attempt)`` puts a failed shard back with an exponential, capped delay
  (``ExtractConfig.retry_delay``), so a transient fault is not retried within the same second.
- ``stop(reason)`` (a full disk) drops what is left; ``finish(shard)`` releases a claim.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from cache.claims import Claim, ShardClaims
from cache.diskfull import DiskFullError
from cache.writer import CacheWriter
from pipeline.extract_config import ExtractConfig
from pipeline.extract_plan import ExtractPlan
from pipeline.extract_report import ShardTracker

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often shards held by another driver are looked at again


class ShardQueue:
    def __init__(self, p: ExtractPlan, cfg: ExtractConfig, tracker: ShardTracker):
        self.plan, self.cfg, self.tracker = p, cfg, tracker
        self.writer = CacheWriter.open(cfg.out, p.manifest)
        self.claims = ShardClaims(self.writer.location, lease_s=cfg.claim_lease_s)
        self.pending: deque[int] = deque(p.todo)
        self.not_before: dict[int, float] = {}
        self.elsewhere: dict[int, Claim] = {}  # shard -> the other driver's claim
        self.attempts: dict[int, int] = dict.fromkeys(p.todo, 0)
        self._announced: set[str] = set()
        self._next_poll = 0.0

    @property
    def empty(self) -> bool:
        """Nothing left to hand out, now or later."""
        return not self.pending and not self.elsewhere

    def replace(self, shard: int) -> bool:
        """Whether ``shard`` is rewritten over its (damaged) marker: a repair."""
        return shard in self.plan.repair

    def next(self) -> int | None:
        """A claimed shard to run now, or None when none is ready yet (see ``wait_s``)."""
        self._poll_elsewhere()
        now = time.monotonic()
        for _ in range(len(self.pending)):
            shard = self.pending.popleft()
            if self.not_before.get(shard, 0.0) > now:
                self.pending.append(shard)
                continue
            holder = self.claims.acquire(shard)
            if holder is not None:
                self._set_aside(shard, holder)
                continue
            if not self.replace(shard) and (done := self.writer.valid_commit(shard)) is not None:
                self.claims.release(shard)
                self.tracker.by_other(shard, done.writer or "another driver")
                continue
            return shard
        return None

    def wait_s(self) -> float:
        """How long to wait before ``next`` can return something (a retry's delay, or the poll)."""
        now = time.monotonic()
        waits = [t - now for s, t in self.not_before.items() if s in self.pending]
        if self.elsewhere:
            waits.append(self._next_poll - now)
        return max(0.05, min(waits, default=POLL_S))

    def retry(self, shard: int) -> bool:
        """Count a failed attempt; True when ``shard`` goes back in the queue (after its backoff),
        False when its attempts are used up (its claim is then released)."""
        self.attempts[shard] = self.attempts.get(shard, 0) + 1
        if self.attempts[shard] > self.cfg.max_shard_retries:
            self.finish(shard)
            return False
        delay = self.cfg.retry_delay(self.attempts[shard])
        log.info("shard %d: retrying in %.1f s (attempt %d)", shard, delay, self.attempts[shard] + 1)
        self.not_before[shard] = time.monotonic() + delay
        self.pending.append(shard)
        return True

    def finish(self, shard: int) -> None:
        self.claims.release(shard)

    def stop(self, reason: str) -> list[int]:
        """Hand out nothing more; returns the shards left undone (not counting running ones)."""
        left = sorted(set(self.pending) | set(self.elsewhere))
        self.pending.clear()
        self.elsewhere.clear()
        log.error("stopping: %s (%d shards left for a rerun)", reason, len(left))
        return left

    def disk_full(self, shard: int, e: BaseException) -> None:
        """A full disk while writing ``shard``: it failed, and the run stops (the rest would fail
        the same way); the report's ``stopped`` says why, with the path and the free space."""
        err = e if isinstance(e, DiskFullError) else DiskFullError(self.plan.cache)
        self.finish(shard)
        self.tracker.failed(shard, str(err))
        if self.tracker.report.stopped is None:
            left = self.stop(str(err))
            self.tracker.report.stopped = f"{err} [{len(left)} shards not attempted]"

    def close(self) -> None:
        self.claims.close()

    # -- shards of other drivers ----------------------------------------------------------------
    def _set_aside(self, shard: int, holder: Claim) -> None:
        self.elsewhere[shard] = holder
        self._next_poll = self._next_poll or time.monotonic() + POLL_S
        if holder.owner not in self._announced:
            self._announced.add(holder.owner)
            log.warning(
                "cache %s is in use by %s: this run leaves the shards it claimed to it and waits for their "
                "commits; a claim whose driver died is taken over when its lease ends (%s/_claims/shard-XXXXX.json; "
                "deleting a dead driver's claims there overrides at once)",
                self.plan.cache,
                holder.describe(),
                self.plan.cache,
            )

    def _poll_elsewhere(self) -> None:
        if not self.elsewhere or time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + POLL_S
        for shard, holder in list(self.elsewhere.items()):
            if (done := self.writer.valid_commit(shard)) is not None:
                del self.elsewhere[shard]
                self.tracker.by_other(shard, done.writer or holder.owner)
                continue
            current, raw = self.claims.read(shard)
            if raw is None or current is None or current.stale():
                del self.elsewhere[shard]  # released without a commit, or its driver died: ours to try
                self.pending.appendleft(shard)
