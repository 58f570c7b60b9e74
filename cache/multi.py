"""Several caches of one pack read as one, joined by image key (``open_caches``).

v1.1 is the v1.0 cache plus a SAM-only extraction; an ablation over teacher sets reads the caches
that hold its teachers. No teacher is ever recomputed to compose a teacher set.

Decisions:
- Same pack or nothing: every cache's manifest must record the same ``dataset_fingerprint``
  (checked at open; the error names both caches and both fingerprints). The join is by image key,
  never by row number: each cache is read at its own rows, so caches written with different
  shard sizes compose too (extractions of one pack do put a key in the same row; a test keeps
  that true, but nothing here relies on it).
- Each teacher comes from exactly one cache: the first in the list that holds it (list order is
  priority, as on a search path). A teacher that a later cache also holds is logged, as a
  warning when the two entries differ (other weights, codec or preprocessing), so shadowing is
  never silent; to take it from the later cache, put that cache first.
- The CLS teacher (``cls_state``/``cls_attn``) is the first cache's that names one, and only if
  that cache also supplies that teacher's tokens (else the union has none).
- ``manifest`` is a view for the trainer: the supplied teachers in order, the CLS teacher, the
  pack's fingerprint and name, ``null_input`` black only when every cache's is. Its
  ``num_shards``/``shard_size`` are the first cache's and say nothing about the others.
- A key is in the union when it is in every cache (the no-image row too); it is failed when any
  cache failed it, and its reason names that cache, so the dataset skips and counts it exactly
  as a failed image of one cache. ``missing_report`` says, per cache, how many keys it lacks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np

from cache.manifest import CacheManifest
from cache.reader import CacheBatch, CacheError, FeatureCache, open_cache

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UnionLocation:
    """Stands in for ``FeatureCache.location`` in messages: ``url`` lists every cache."""

    urls: tuple[str, ...]

    @property
    def url(self) -> str:
        return "[" + ", ".join(self.urls) + "]"


class CacheUnion:
    """The ``FeatureCache`` reading interface over several caches of one pack (module docstring)."""

    def __init__(self, caches: Sequence[FeatureCache]):
        if len(caches) < 2:
            raise CacheError(f"a cache union needs at least two caches, got {len(caches)}; open one with open_cache")
        self.parts = tuple(caches)
        self.location = UnionLocation(tuple(c.location.url for c in self.parts))
        first = self.parts[0]
        for other in self.parts[1:]:
            a, b = first.manifest, other.manifest
            if a.dataset_fingerprint != b.dataset_fingerprint:
                raise CacheError(
                    f"caches {first.location.url} (dataset {a.dataset_name!r}, fingerprint {a.dataset_fingerprint}) "
                    f"and {other.location.url} (dataset {b.dataset_name!r}, fingerprint {b.dataset_fingerprint}) "
                    "were extracted from different packs; compose only caches of the same pack"
                )
        self.source = self._assign_teachers()  # teacher -> index into parts
        self.manifest = self._view()

    def _assign_teachers(self) -> dict[str, int]:
        source: dict[str, int] = {}
        for i, part in enumerate(self.parts):
            for t in part.manifest.teachers:
                if t.name not in source:
                    source[t.name] = i
                    continue
                kept = self.parts[source[t.name]]
                same = kept.manifest.teacher(t.name) == t
                (log.info if same else log.warning)(
                    "teacher %r is in %s and %s%s: taken from %s (the first in the list)",
                    t.name,
                    kept.location.url,
                    part.location.url,
                    "" if same else " with different entries (weights, codec or preprocessing)",
                    kept.location.url,
                )
        return source

    def _view(self) -> CacheManifest:
        first = self.parts[0].manifest
        teachers = tuple(self.parts[i].manifest.teacher(n) for n, i in self.source.items())
        self.cls_part = next((i for i, p in enumerate(self.parts) if p.manifest.cls_teacher is not None), None)
        cls = None if self.cls_part is None else self.parts[self.cls_part].manifest.cls_teacher
        if cls is not None and self.source[cls] != self.cls_part:
            cls, self.cls_part = None, None
        stale = next((p.manifest for p in self.parts if p.manifest.null_input != "black"), None)
        return dataclasses.replace(
            first,
            teachers=teachers,
            cls_teacher=cls,
            null_input=first.null_input if stale is None else stale.null_input,
            format_version=first.format_version if stale is None else stale.format_version,
            notes={"caches": list(self.location.urls)},
        )

    # -- keys ----------------------------------------------------------------------------------
    def part_of(self, teacher: str) -> FeatureCache:
        """The cache that supplies ``teacher``."""
        if teacher not in self.source:
            raise CacheError(f"teacher {teacher!r} is in none of {self.location.url} (have {list(self.source)})")
        return self.parts[self.source[teacher]]

    def select(self, teachers: Iterable[str]) -> CacheUnion | FeatureCache:
        """The union of only the caches that supply ``teachers`` or the CLS teacher: a cache that
        supplies nothing read then no longer decides which keys are valid."""
        used = sorted({self.source[t] for t in teachers} | ({self.cls_part} if self.cls_part is not None else set()))
        if len(used) == len(self.parts):
            return self
        parts = [self.parts[i] for i in used]
        return parts[0] if len(parts) == 1 else CacheUnion(parts)

    def keys(self) -> list[str]:
        return [k for k in self.parts[0].keys() if all(k in p for p in self.parts[1:])]

    def __contains__(self, key: str) -> bool:
        return all(key in p for p in self.parts)

    def __len__(self) -> int:
        return len(self.keys())

    def failed(self) -> dict[str, str]:
        """Keys failed in any cache, each reason prefixed by the cache that failed it."""
        out: dict[str, str] = {}
        for p in self.parts:
            for k, why in p.failed().items():
                out.setdefault(k, f"{p.location.url}: {why}")
        return out

    def is_valid(self, key: str) -> bool:
        return all(p.is_valid(key) for p in self.parts)

    def missing_report(self, keys: Iterable[str]) -> str:
        """Per cache, how many of ``keys`` it lacks, e.g. ``cache B lacks 3 (e.g. ['k1'])``."""
        keys = list(keys)
        lines = []
        for p in self.parts:
            lacking = [k for k in keys if k not in p]
            if lacking:
                lines.append(f"cache {p.location.url} lacks {len(lacking)} (e.g. {lacking[:3]})")
        return "; ".join(lines)

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts)

    # -- reading -------------------------------------------------------------------------------
    def read(
        self,
        keys: Sequence[str],
        teachers: Iterable[str] | None = None,
        dtype: np.dtype | str = np.float32,
        aux: bool = True,
        allow_invalid: bool = False,
        decode: bool = True,
    ) -> CacheBatch:
        """``FeatureCache.read`` with each teacher read from its cache. ``rows`` are the first
        cache's; ``valid`` is the AND over every cache (a key failed in an unread cache included)."""
        keys = list(keys)
        names = list(self.source if teachers is None else teachers)
        by_part: dict[int, list[str]] = {}
        for name in names:
            by_part.setdefault(self.source[name] if name in self.source else -1, []).append(name)
        if -1 in by_part:
            raise CacheError(f"teacher(s) {by_part[-1]} are in none of {self.location.url}")
        if aux and self.cls_part is not None:
            by_part.setdefault(self.cls_part, [])
        feats, cls_state, cls_attn = {}, None, None
        valid = np.ones(len(keys), dtype=bool)
        for i, part in enumerate(self.parts):
            if i not in by_part:
                valid &= np.array([part.is_valid(k) for k in keys], dtype=bool)
                continue
            got = part.read(keys, by_part[i], dtype, aux and i == self.cls_part, allow_invalid, decode)
            feats.update(got.features)
            valid &= got.valid
            if i == self.cls_part and aux:
                cls_state, cls_attn = got.cls_state, got.cls_attn
        if not allow_invalid and not valid.all():
            bad = [k for k, v in zip(keys, valid) if not v][:5]
            raise CacheError(
                f"image(s) {bad} failed extraction in {self.location.url}; skip them or pass allow_invalid"
            )
        rows = np.array([self.parts[0].row(k) for k in keys], dtype=np.int64)
        return CacheBatch(keys, rows, {n: feats[n] for n in names}, cls_state, cls_attn, valid)


def open_caches(locations: str | os.PathLike | Sequence[str | os.PathLike]) -> FeatureCache | CacheUnion:
    """One location (or a list of one): ``open_cache``, unchanged. Several: their ``CacheUnion``."""
    if isinstance(locations, (str, os.PathLike)):
        return open_cache(locations)
    locations = list(locations)
    if not locations:
        raise CacheError("no cache given (an empty list)")
    if len(set(map(str, locations))) != len(locations):
        raise CacheError(f"a cache is listed twice in {[str(x) for x in locations]}")
    caches = [open_cache(loc) for loc in locations]
    return caches[0] if len(caches) == 1 else CacheUnion(caches)


__all__ = ["CacheUnion", "UnionLocation", "open_caches"]
