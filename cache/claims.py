"""Shard claims: a lease file per shard, so two extraction drivers never compute the same shard.

``_claims/shard-XXXXX.json`` says which driver is working on a shard and until when (FORMAT.md
section 6). A driver claims a shard before handing it to a worker, renews its claims from a
background thread while they are worked on, and deletes a claim once the shard is committed (or
given up). Another driver skips shards claimed by a live driver and waits for them to be
committed; a claim whose lease has expired, or whose owner is a dead process on this host, is
stale and is taken over.

Decisions:
- Claims are advisory and only order *work*; correctness never depends on them: the writer never
  uncommits a valid marker (a second commit of the same shard is refused), so even two drivers
  whose leases raced write identical data and the first marker stays.
- Creation is atomic (``Location.create_exclusive``: hard link locally, conditional PUT on object
  stores where fsspec offers it); taking over a stale claim removes it only if it is unchanged
  (``Location.remove_if_unchanged``), then creates a new one, so of two drivers taking over the
  same stale claim one wins.
- Times are wall-clock seconds since the epoch (claims are read by other hosts); a lease is long
  (default 120 s) next to the renewal period (a third of it), so clock skew of seconds is harmless.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from cache.store import Location

log = logging.getLogger(__name__)

CLAIMS = "_claims"
CLAIM_VERSION = 1


def claim_name(shard: int) -> str:
    return f"{CLAIMS}/shard-{shard:05d}.json"


def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    """What a claim file records."""

    shard: int
    owner: str  # hostname:pid of the driver
    run: str  # the driver's run id (a new one per run)
    expires: float  # epoch seconds; renewed while the shard is worked on
    lease_s: float

    def to_bytes(self) -> bytes:
        d = {"claim_version": CLAIM_VERSION, "shard": self.shard, "owner": self.owner, "run": self.run}
        d |= {"expires": round(self.expires, 3), "lease_s": self.lease_s}
        d["expires_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.expires))
        return json.dumps(d).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Claim:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("claim_version") != CLAIM_VERSION:
            raise ValueError("not a claim of a known version")
        return cls(int(d["shard"]), str(d["owner"]), str(d["run"]), float(d["expires"]), float(d["lease_s"]))

    def owner_alive(self) -> bool | None:
        """True/False when the owner runs on this host (checked by pid); None for another host."""
        host, _, pid = self.owner.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return None
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stale(self, now: float | None = None) -> bool:
        return (now or time.time()) > self.expires or self.owner_alive() is False

    def describe(self) -> str:
        left = self.expires - time.time()
        return f"driver {self.owner} (run {self.run}; its lease ends in {max(left, 0):.0f} s unless renewed)"


class ShardClaims:
    """The claims one driver holds on one cache, renewed in the background until ``close``."""

    def __init__(self, location: str | os.PathLike | Location, lease_s: float = 120.0, run: str | None = None):
        self.location = location if isinstance(location, Location) else Location(location)
        self.lease_s, self.owner = float(lease_s), this_owner()
        self.run = run or uuid.uuid4().hex[:12]
        self._held: dict[int, bytes] = {}  # shard -> bytes of our claim file as last written
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mine(self, shard: int) -> Claim:
        return Claim(shard, self.owner, self.run, time.time() + self.lease_s, self.lease_s)

    def read(self, shard: int) -> tuple[Claim | None, bytes | None]:
        """The claim on ``shard`` (None when unreadable) and its raw bytes (None when absent)."""
        raw = self.location.read_bytes(claim_name(shard))
        if raw is None:
            return None, None
        try:
            return Claim.from_bytes(raw), raw
        except (ValueError, KeyError, TypeError):
            return None, raw

    def acquire(self, shard: int) -> Claim | None:
        """Claim ``shard``. None: this driver holds it now; else the live claim of the holder."""
        with self._lock:
            if shard in self._held:
                return None
        for _ in range(3):  # a stale claim taken over by another driver meanwhile: look again
            data = self._mine(shard).to_bytes()
            if self.location.create_exclusive(claim_name(shard), data):
                with self._lock:
                    self._held[shard] = data
                self._start()
                return None
            current, raw = self.read(shard)
            if raw is None:
                continue  # released since: try again
            if current is not None and not current.stale():
                return current
            why = "unreadable" if current is None else f"stale, of {current.owner} (run {current.run})"
            if self.location.remove_if_unchanged(claim_name(shard), raw):
                log.info("shard %d: took over a %s claim", shard, why)
        current, _ = self.read(shard)
        return current or self._mine(shard)  # contended: treat as held, look again later

    def release(self, shard: int) -> None:
        """Give up the claim on ``shard`` (after its commit, or when giving it up)."""
        with self._lock:  # not while a renewal rewrites it
            data = self._held.pop(shard, None)
            if data is not None:
                self.location.remove_if_unchanged(claim_name(shard), data)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def renew(self) -> None:
        """Extend every held lease; a claim found changed (taken over after our lease ran out) is
        dropped from what we hold, with a warning."""
        for shard in self.held():
            with self._lock:  # one shard at a time, so a release never races its renewal
                data = self._held.get(shard)
                if data is None:
                    continue  # released meanwhile
                if self.location.read_bytes(claim_name(shard)) != data:
                    log.warning("shard %d: our claim was taken over by another driver (our lease had run out)", shard)
                    del self._held[shard]
                    continue
                new = self._mine(shard).to_bytes()
                self.location.write_atomic(claim_name(shard), new)
                self._held[shard] = new

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name="claim-renewal", daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried next period
                log.warning("renewing shard claims failed (%s: %s)", type(e).__name__, e)

    def close(self) -> None:
        """Stop renewing and release every claim still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for shard in self.held():
            try:
                self.release(shard)
            except OSError as e:  # e.g. a full disk: the claims expire by themselves
                log.warning("could not release the claim on shard %d (%s); it expires by itself", shard, e)
