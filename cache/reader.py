"""Reading a cache: open by path or URL, look rows up by image key, read dequantised batches.

Decisions:
- Only committed shards are visible: the key index is built from commit markers, so rows of a
  shard that is still being written (or died mid-write) cannot be read, and asking for them says so.
- Reads take one slice per run of consecutive sorted rows (zarr's integer-array selection is far
  slower on sharded arrays), then are put back in the caller's order.
- Safe in DataLoader workers: zarr handles are opened lazily per process (a fork or pickle makes
  the next read reopen them), so each worker has its own handle.
- No silent zeros: zarr reads a missing shard file as its fill value (0). The first read of an
  array in a committed shard (per process) checks that shard's file against the size its marker
  recorded (one stat, or one HEAD request on an object store, per array and shard; never a
  checksum), so a file lost to a partial copy or truncated is an error naming the shard and the
  repair, not zero targets. Markers written before sizes were recorded get an existence check
  (a missing file is legitimate only when every image of the shard failed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import zarr

from cache.codecs import get_codec
from cache.layout import (
    CLS_ATTN,
    CLS_STATE,
    COMMITS,
    MARKER_NAME,
    STATS_FILE,
    TEACHERS,
    array_file_key,
    marker_name,
)
from cache.manifest import ATTRS_KEY, CacheManifest, ManifestError
from cache.marker import ShardCommit
from cache.store import Location

log = logging.getLogger(__name__)


class CacheError(ValueError):
    """A cache that is missing, incomplete, or asked for something it does not hold."""


def load_manifest(loc: Location, mode: str = "r") -> tuple[CacheManifest, zarr.Group]:
    """Open the group at ``loc`` and validate its manifest, with errors that say what to do."""
    if not loc.exists("zarr.json"):
        raise CacheError(f"no cache at {loc.url} (no zarr.json); create it with the writer or `movekd extract`")
    try:
        group = zarr.open_group(loc.zarr_path, mode=mode)
    except Exception as e:  # noqa: BLE001 - zarr raises many types for unreadable metadata
        raise CacheError(f"cannot open the zarr group at {loc.url}: {e}") from e
    attrs = group.attrs.asdict()
    if ATTRS_KEY not in attrs:
        raise CacheError(f"{loc.url} is a zarr group but not a movekd cache (no '{ATTRS_KEY}' attribute)")
    try:
        return CacheManifest.from_dict(attrs[ATTRS_KEY]), group
    except ManifestError as e:
        raise CacheError(f"{loc.url}: {e}") from e


@dataclass
class CacheBatch:
    """Rows read from a cache. ``features[teacher]`` is ``[B, N, C]``; aux arrays may be None."""

    keys: list[str]
    rows: np.ndarray
    features: dict[str, np.ndarray]  # or {teacher: {component: array}} from read(decode=False)
    cls_state: np.ndarray | None
    cls_attn: np.ndarray | None
    valid: np.ndarray


class FeatureCache:
    """Read access to a cache; see ``open_cache``."""

    def __init__(self, location: str | os.PathLike):
        self.location = Location(location)
        self.manifest, _ = load_manifest(self.location)
        self._group, self._pid = None, None
        self.commits: dict[int, ShardCommit] = {}
        self._index: dict[str, int] = {}
        self._failed: dict[str, str] = {}
        self._checked: set[tuple[str, int]] = set()  # (array path, shard) whose file was checked
        self.marker_problems: dict[str, str] = {}  # marker file name -> why it is ignored
        self.ignored_files: list[str] = []  # files in _commits/ that are not markers
        self.reload()

    # -- index -------------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read commit markers (picks up shards committed since opening).

        One bad file never makes the cache unreadable: a marker that cannot be read, names another
        shard, lies outside the manifest's shards or repeats another shard's key leaves its shard
        invisible and is listed in ``marker_problems`` (``verify`` reports each by file name);
        files that are not markers at all are ignored with a warning (``ignored_files``)."""
        commits, index, failed, problems, ignored = {}, {}, {}, {}, []
        for name in self.location.list(COMMITS):
            if ".json.tmp-" in name:
                continue  # temp file of an in-flight commit
            m = MARKER_NAME.fullmatch(name)
            if m is None:
                ignored.append(name)
                continue
            shard = int(m.group(1))
            raw = self.location.read_bytes(f"{COMMITS}/{name}")
            if raw is None:
                continue  # removed since listing: a rewrite of that shard has just uncommitted it
            try:
                if shard > self.manifest.num_shards:
                    raise ValueError(f"shard {shard} is outside the manifest's 0..{self.manifest.num_shards}")
                marker = ShardCommit.from_dict(json.loads(raw))
                if marker.shard != shard:
                    raise ValueError(f"it names shard {marker.shard}")
                start, stop = self.manifest.shard_rows(shard)
                if marker.count > stop - start:
                    raise ValueError(f"{marker.count} keys for a shard of {stop - start} rows")
                dup = next((k for k in marker.keys if k in index), None)
                if dup is not None:
                    raise ValueError(f"key {dup!r} is also in row {index[dup]} (a duplicate image)")
            except (TypeError, ValueError, KeyError) as e:
                problems[name] = str(e)
                continue
            for i, key in enumerate(marker.keys):
                index[key] = start + i
            failed.update(marker.failed)
            commits[shard] = marker
        for name, why in problems.items():
            log.warning("%s: commit marker %s is ignored (%s); %s", self.location.url, name, why, self.repair_hint())
        if ignored:
            log.warning(
                "%s: ignoring files in %s/ that are not commit markers: %s", self.location.url, COMMITS, ignored
            )
        self.commits, self._index, self._failed = commits, index, failed
        self.marker_problems, self.ignored_files = problems, ignored
        self._checked = set()

    @property
    def committed_shards(self) -> list[int]:
        return sorted(s for s in self.commits if s < self.manifest.num_shards)

    @property
    def complete(self) -> bool:
        return len(self.committed_shards) == self.manifest.num_shards

    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def failed(self) -> dict[str, str]:
        """Keys whose extraction failed, with the reason recorded at write time."""
        return dict(self._failed)

    def is_valid(self, key: str) -> bool:
        return key in self._index and key not in self._failed

    def row(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise CacheError(f"image key {key!r} is not in any committed shard of {self.location.url}") from None

    # -- reading -----------------------------------------------------------------------------
    def _arrays(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            self._group, self._pid = zarr.open_group(self.location.zarr_path, mode="r"), os.getpid()
        return self._group

    def array(self, path: str) -> zarr.Array:
        """The zarr array at ``path`` (e.g. ``teachers/eva/values``); CacheError when absent."""
        try:
            return self._arrays()[path]
        except KeyError:
            raise CacheError(f"{self.location.url}: array {path} is missing") from None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_group"] = None
        return state

    def read(
        self,
        keys: Sequence[str],
        teachers: Iterable[str] | None = None,
        dtype: np.dtype | str = np.float32,
        aux: bool = True,
        allow_invalid: bool = False,
        decode: bool = True,
    ) -> CacheBatch:
        """Read ``keys`` (in order) for ``teachers`` (default all), dequantised to ``dtype``.

        ``decode=False``: ``features[teacher]`` is the stored components instead, ``{component:
        array [B, *shape]}`` exactly as the codec wrote them (``get_codec(codec).decode`` of them is
        what ``decode=True`` returns), for a consumer that dequantises elsewhere (on the GPU)."""
        keys = list(keys)
        rows = np.array([self.row(k) for k in keys], dtype=np.int64)
        valid = np.array([k not in self._failed for k in keys], dtype=bool)
        if not allow_invalid and not valid.all():
            bad = [k for k, v in zip(keys, valid) if not v][:5]
            raise CacheError(
                f"image(s) {bad} failed extraction ({self._failed[bad[0]]}); skip them or pass allow_invalid"
            )
        names = list(self.manifest.teacher_names if teachers is None else teachers)
        feats = {}
        for name in names:
            t = self.manifest.teacher(name)
            codec = get_codec(t.codec)
            parts = {
                c.name: self.read_rows(f"{TEACHERS}/{name}/{c.name}", rows)
                for c in codec.components(t.tokens, t.channels)
            }
            feats[name] = codec.decode(parts, dtype) if decode else parts
        cls_state = cls_attn = None
        if aux and self.manifest.cls_teacher is not None:
            cls_state = self.read_rows(CLS_STATE, rows).astype(dtype, copy=False)
            cls_attn = self.read_rows(CLS_ATTN, rows).astype(dtype, copy=False)
        return CacheBatch(keys, rows, feats, cls_state, cls_attn, valid)

    def read_rows(self, path: str, rows: np.ndarray) -> np.ndarray:
        """Raw stored values of array ``path`` at ``rows`` (any order, duplicates allowed).

        One basic slice per run of consecutive sorted rows: zarr 3.1's integer-array (orthogonal)
        selection on sharded arrays is 20-100x slower per chunk (zarr-python #3829; measured by
        bench/bench_loading.py)."""
        rows = np.asarray(rows, dtype=np.int64)
        arr = self._arrays()[path]
        if rows.size == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        uniq, inverse = np.unique(rows, return_inverse=True)
        for shard in np.unique(uniq // self.manifest.shard_size).tolist():
            if (path, shard) not in self._checked:
                self.check_file(path, arr.ndim - 1, int(shard))
        runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1)
        try:
            parts = [arr[int(r[0]) : int(r[-1]) + 1] for r in runs]
        except Exception as e:  # noqa: BLE001 - zarr/numcodecs raise many types for a corrupt shard file
            shards = sorted({int(r) // self.manifest.shard_size for r in uniq})
            raise CacheError(
                f"{self.location.url}: {path} cannot be decoded in shard(s) {shards[:5]} ({type(e).__name__}: {e}); "
                f"{self.repair_hint()}"
            ) from e
        return (parts[0] if len(parts) == 1 else np.concatenate(parts))[inverse]

    def repair_hint(self) -> str:
        """What to do about a damaged committed shard (named in every such error)."""
        return (
            f"`movekd cache verify {self.location.url}` lists the damaged shards and `movekd extract --config CONFIG "
            f"--repair` (CONFIG: the extraction config that wrote this cache) re-extracts exactly those"
        )

    def file_problem(self, path: str, per_row_ndim: int, shard: int) -> str | None:
        """What is wrong with the committed shard file of ``path`` in ``shard`` (None: it is there
        with the size its marker recorded). One stat / HEAD request; no data is read."""
        marker = self.commits.get(shard)
        if marker is None:
            return f"shard {shard:05d} is not committed"
        key = array_file_key(path, per_row_ndim, shard)
        size = self.location.size(key)
        if key in marker.files:
            want = marker.files[key]
            if (size or 0) != want:
                found = "is missing" if size is None else f"has {size} bytes"
                return (
                    f"shard {shard:05d} is damaged: its data file {key} {found}, but its commit marker recorded "
                    f"{want} bytes (a partial copy or a truncated write; zarr would read the gap as zeros)"
                )
        elif size is None and not all(k in marker.failed for k in marker.keys):
            return (
                f"shard {shard:05d} is damaged: its data file {key} is missing but the shard has valid images "
                f"(zarr would read them as zeros)"
            )
        return None

    def check_file(self, path: str, per_row_ndim: int, shard: int) -> None:
        """``file_problem`` as an error naming the repair; remembered per process once it passes."""
        problem = self.file_problem(path, per_row_ndim, shard)
        if problem:
            raise CacheError(f"{self.location.url}: {problem}; {self.repair_hint()}")
        self._checked.add((path, shard))

    def read_shard_raw(self, path: str, shard: int) -> np.ndarray:
        """The stored values of ``path`` for the committed rows of ``shard``."""
        start, _ = self.manifest.shard_rows(shard)
        return self._arrays()[path][start : start + self.commits[shard].count]

    # -- statistics --------------------------------------------------------------------------
    def channel_stats(self, teacher: str) -> dict[str, np.ndarray]:
        """Stored per-channel ``mean``/``std`` of a teacher (see ``cache.stats``)."""
        raw = self.location.read_bytes(STATS_FILE)
        if raw is None:
            raise CacheError(
                f"{self.location.url} has no channel statistics; run `movekd cache stats {self.location.url}`"
            )
        stats = json.loads(raw)["teachers"]
        if teacher not in stats:
            raise CacheError(f"channel statistics hold no teacher {teacher!r} (have {sorted(stats)})")
        return {k: np.asarray(stats[teacher][k], dtype=np.float32) for k in ("mean", "std")}


def open_cache(location: str | os.PathLike) -> FeatureCache:
    """Open a cache for reading: a local path or any fsspec URL zarr supports."""
    return FeatureCache(location)


__all__ = ["CacheBatch", "CacheError", "FeatureCache", "load_manifest", "marker_name", "open_cache"]
