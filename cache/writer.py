"""Writing a cache: create once, write whole shards, commit each with a marker written last.

Lifecycle (MosaicML-streaming style):

1. ``CacheWriter.create(location, manifest)`` creates the group and every array (idempotent:
   opening an existing cache checks the manifest and refuses any difference, naming the field).
2. ``write_shard(shard, keys, features, ...)`` refuses a shard whose marker is valid (a committed
   shard never vanishes under a reader; ``replace=True`` is the explicit repair), else *removes*
   the shard's (unreadable) marker (so a rewrite that dies midway never looks committed), writes
   every array's rows of that shard as whole zarr shards, then writes the marker atomically: keys,
   failed keys with reasons, and a checksum of every array's stored rows. Only markers make rows
   visible to readers.
3. Several processes may write different shards at once: each zarr shard and marker is its own
   file, and array metadata is only written by ``create``. Drivers keep off each other's shards
   with claims (``cache.claims``); two ``create`` calls racing on a new cache both succeed.
4. A full disk is a ``DiskFullError`` naming the file and the free space (``cache.diskfull``).

Checksums are blake2b over the *encoded* arrays (what zarr stores, before compression), so they
are store-independent and ``verify`` catches both undecodable and silently changed shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Mapping

import numpy as np
import zarr

from cache.codecs import NonFiniteError, check_finite, get_codec
from cache.diskfull import disk_full_as_error
from cache.layout import (
    CLS_ATTN,
    CLS_STATE,
    MARKER_NAME,
    TEACHERS,
    array_file_key,
    array_specs,
    create_arrays,
    marker_name,
)
from cache.manifest import ATTRS_KEY, CacheManifest
from cache.marker import NULL_KEY, ShardCommit, checksum
from cache.reader import CacheError, load_manifest
from cache.store import Location

log = logging.getLogger(__name__)

CREATE_WAIT_S = 60.0  # how long ``open`` waits for arrays another driver is creating


class ShardCommittedError(CacheError):
    """A write of a shard whose marker is valid, without ``replace=True``."""


class CacheWriter:
    """Writes shards of one cache. Use ``create`` (driver) or ``open`` (workers)."""

    def __init__(self, location: Location, group: zarr.Group, manifest: CacheManifest):
        self.location, self.group, self.manifest = location, group, manifest

    @classmethod
    def create(cls, location: str | os.PathLike, manifest: CacheManifest) -> CacheWriter:
        """Create the cache, or open it if it exists with an identical manifest (also when another
        driver creates it at the same moment)."""
        loc = Location(location)
        if loc.exists("zarr.json"):
            return cls.open(location, manifest)
        with disk_full_as_error(loc.url):
            try:
                group = zarr.open_group(loc.zarr_path, mode="w-", attributes={ATTRS_KEY: manifest.to_dict()})
            except Exception:  # noqa: BLE001 - zarr's "already exists" types vary by store
                if loc.exists("zarr.json"):  # another driver created it first
                    return cls.open(location, manifest)
                raise
            create_arrays(group, manifest)
        log.info(
            "created cache %s (%d shards x %d rows, teachers %s)",
            loc.url,
            manifest.num_shards,
            manifest.shard_size,
            ", ".join(manifest.teacher_names),
        )
        return cls(loc, group, manifest)

    @classmethod
    def open(cls, location: str | os.PathLike, manifest: CacheManifest) -> CacheWriter:
        """Open an existing cache for writing; refuses if ``manifest`` differs from the stored one."""
        loc = Location(location)
        existing, group = load_manifest(loc, mode="r+")
        existing.check_same(manifest, what=f"cache at {loc.url}")
        _wait_for_arrays(loc, existing)
        return cls(loc, group, existing)

    @classmethod
    def open_for_null_row(cls, location: str | os.PathLike, requested: CacheManifest) -> CacheWriter:
        """Open a cache whose no-image row is to be rewritten with ``requested``'s input
        (``pipeline.extract_null``): the stored manifest must equal ``requested`` except for
        ``format_version``, ``null_input`` and the teachers' ``preprocess.alpha`` (the black
        image has no alpha, and the data rows keep the alpha mode they were written with).

        Uncommits the no-image row, then replaces the manifest atomically by the stored one at
        the current format with ``null_input = requested.null_input``. A crash after this leaves
        a cache whose manifest is right and whose no-image row is missing, which `movekd extract`
        (or a rerun) writes; a committed row never disagrees with the manifest."""
        loc = Location(location)
        existing, _ = load_manifest(loc, mode="r+")
        upgraded = dataclasses.replace(existing.with_black_null_input(), null_input=requested.null_input)
        ignore = {"teachers": {t.name: t.preprocess.alpha for t in existing.teachers}}
        upgraded.check_same(_with_alpha(requested, ignore), what=f"cache at {loc.url}")
        loc.delete(marker_name(existing.num_shards))
        meta = json.loads(loc.read_bytes("zarr.json"))
        meta["attributes"][ATTRS_KEY] = upgraded.to_dict()
        loc.write_atomic("zarr.json", json.dumps(meta, indent=2).encode())
        return cls(loc, zarr.open_group(loc.zarr_path, mode="r+"), upgraded)

    # -- state -----------------------------------------------------------------------------
    def committed_shards(self) -> set[int]:
        """Shards with a marker file of the right name, within the manifest's range (stray files
        such as ``shard-abcde.json`` or ``shard-99999.json`` are not shards of this cache)."""
        shards = {int(m.group(1)) for n in self.location.list("_commits") if (m := MARKER_NAME.fullmatch(n))}
        return {s for s in shards if s <= self.manifest.num_shards}

    def is_committed(self, shard: int) -> bool:
        return self.location.exists(marker_name(shard))

    def valid_commit(self, shard: int) -> ShardCommit | None:
        """The shard's marker when it is there and readable (None: absent or unusable)."""
        raw = self.location.read_bytes(marker_name(shard))
        if raw is None:
            return None
        try:
            marker = ShardCommit.from_dict(json.loads(raw))
        except (TypeError, ValueError, KeyError):
            return None
        return marker if marker.shard == shard else None

    # -- writing -----------------------------------------------------------------------------
    def write_shard(
        self,
        shard: int,
        keys: list[str],
        features: Mapping[str, np.ndarray],
        cls_state: np.ndarray | None = None,
        cls_attn: np.ndarray | None = None,
        failed: Mapping[str, str] | None = None,
        nonfinite: str = "raise",
        replace: bool = False,
    ) -> ShardCommit:
        """Write and commit one whole shard.

        ``keys`` are the shard's images in row order (failed ones included); ``features[t]`` is
        ``[len(keys), tokens, channels]`` per teacher; rows of ``failed`` keys are stored as zeros
        and marked invalid. ``nonfinite="raise"`` raises on NaN/Inf naming the images;
        ``"mark_failed"`` records those images as failed instead. A shard whose marker is valid is
        refused (``ShardCommittedError``) unless ``replace=True`` (repairing it: readers then do
        not see the shard until it is committed again).
        """
        failed = dict(failed or {})
        self._check_shard(shard, keys, failed)
        feats, cls_state, cls_attn = self._validated(keys, features, cls_state, cls_attn)
        self._check_values(keys, feats, None, None, failed, nonfinite)  # cls rows: in write_encoded
        bad = np.array([k in failed for k in keys], dtype=bool)
        encoded = {}
        for t in self.manifest.teachers:
            x = feats[t.name].astype(np.float32, copy=True)
            x[bad] = 0
            encoded[t.name] = get_codec(t.codec).encode(x)
        return self.write_encoded(shard, keys, encoded, cls_state, cls_attn, failed, nonfinite, replace)

    def write_encoded(
        self,
        shard: int,
        keys: list[str],
        encoded: Mapping[str, Mapping[str, np.ndarray]],
        cls_state: np.ndarray | None = None,
        cls_attn: np.ndarray | None = None,
        failed: Mapping[str, str] | None = None,
        nonfinite: str = "raise",
        replace: bool = False,
    ) -> ShardCommit:
        """Like ``write_shard`` for features already encoded with each teacher's codec
        (``encoded[teacher][component]`` = ``[len(keys), *component shape]``), so an extraction
        worker can quantise batch by batch and never hold a shard of float features.

        The float ``cls_state``/``cls_attn`` rows of images not in ``failed`` must be finite:
        ``nonfinite="raise"`` raises naming the images, ``"mark_failed"`` records them as failed
        (their rows are then stored as zeros, like every failed image's)."""
        failed = dict(failed or {})
        start, stop = self._check_shard(shard, keys, failed)
        arrays = self._encoded_arrays(keys, encoded)
        if self.manifest.cls_teacher is not None:
            _, cls_state, cls_attn = self._validated(keys, None, cls_state, cls_attn)
            self._check_values(keys, {}, cls_state, cls_attn, failed, nonfinite)
            arrays[CLS_STATE], arrays[CLS_ATTN] = cls_state.astype(np.float32), cls_attn.astype(np.float32)
        bad = np.array([k in failed for k in keys], dtype=bool)
        if not replace:
            self._refuse_committed(shard)
        with disk_full_as_error(self.location.url):
            self.location.delete(marker_name(shard))  # uncommit (an unreadable marker, or a repair)
            for path, arr in arrays.items():  # start from no file: zarr would merge into a damaged one
                self.location.delete(array_file_key(path, arr.ndim - 1, shard))
            checksums, files = {}, {}
            for path, arr in arrays.items():
                if bad.any():
                    arr = arr.copy()
                    arr[bad] = 0
                checksums[path] = self._write_rows(path, start, stop, arr)
                key = array_file_key(path, arr.ndim - 1, shard)
                files[key] = self.location.size(key) or 0  # 0: all chunks equal the fill value, no file
            commit = ShardCommit(
                shard,
                list(keys),
                failed,
                checksums,
                time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                f"{socket.gethostname()}:{os.getpid()}",
                files,
            )
            if not replace:
                self._refuse_committed(shard)  # committed by another writer meanwhile: keep its marker
            self.location.write_atomic(marker_name(shard), json.dumps(commit.to_dict()).encode())
        log.debug("committed shard %d (%d rows, %d failed)", shard, len(keys), len(failed))
        return commit

    def _refuse_committed(self, shard: int) -> None:
        existing = self.valid_commit(shard)
        if existing is not None:
            raise ShardCommittedError(
                f"{self.location.url}: shard {shard:05d} is already committed (by {existing.writer or 'unknown'} "
                f"at {existing.written_at or 'unknown time'}); a rewrite would uncommit it under its readers. "
                f"To re-extract a damaged shard use `movekd extract --config CONFIG --repair` (write with replace=True)"
            )

    def _encoded_arrays(self, keys, encoded) -> dict[str, np.ndarray]:
        names = set(self.manifest.teacher_names)
        if set(encoded) != names:
            raise ValueError(f"encoded features must hold exactly the teachers {sorted(names)}, got {sorted(encoded)}")
        arrays = {}
        for t in self.manifest.teachers:
            for comp in get_codec(t.codec).components(t.tokens, t.channels):
                arr = np.asarray(encoded[t.name].get(comp.name))
                want = (len(keys), *comp.shape)
                if arr.shape != want or arr.dtype != np.dtype(comp.dtype):
                    raise ValueError(
                        f"teacher {t.name} ({t.codec}): component {comp.name!r} must be "
                        f"{comp.dtype} {want}, got {arr.dtype} {arr.shape}"
                    )
                arrays[f"{TEACHERS}/{t.name}/{comp.name}"] = arr
        return arrays

    def write_null(
        self, features: Mapping[str, np.ndarray], cls_state=None, cls_attn=None, replace: bool = False
    ) -> ShardCommit:
        """Write the reserved "no image" row (the teachers' outputs for the input the manifest's
        ``null_input`` names); ``replace=True`` rewrites a committed one (``--rewrite-null-row``)."""
        return self.write_shard(self.manifest.num_shards, [NULL_KEY], features, cls_state, cls_attn, replace=replace)

    def _write_rows(self, path: str, start: int, stop: int, arr: np.ndarray) -> str:
        """Write rows [start, start+len(arr)) padded with zeros to the whole zarr shard."""
        full = np.zeros((stop - start, *arr.shape[1:]), dtype=arr.dtype)
        full[: len(arr)] = arr
        self.group[path][start:stop] = full
        return checksum(arr)

    # -- validation --------------------------------------------------------------------------
    def _check_shard(self, shard: int, keys: list[str], failed: dict) -> tuple[int, int]:
        m = self.manifest
        start, stop = m.shard_rows(shard)
        if not keys:
            raise ValueError(f"shard {shard}: no keys to write")
        if len(keys) > stop - start:
            raise ValueError(f"shard {shard}: {len(keys)} keys but the shard holds {stop - start} rows")
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise ValueError(f"shard {shard}: duplicate keys {dup}")
        if shard < m.num_shards and NULL_KEY in keys:
            raise ValueError(f"shard {shard}: key {NULL_KEY!r} is reserved for the no-image row")
        unknown = sorted(set(failed) - set(keys))
        if unknown:
            raise ValueError(f"shard {shard}: failed keys {unknown[:5]} are not among the shard's keys")
        return start, stop

    def _validated(self, keys, features, cls_state, cls_attn):
        m, n = self.manifest, len(keys)
        feats = {} if features is None else self._validated_features(keys, features)
        if m.cls_teacher is None:
            if cls_state is not None or cls_attn is not None:
                raise ValueError("this cache has no cls_teacher: pass no cls_state/cls_attn")
            return feats, None, None
        cls = m.teacher(m.cls_teacher)
        for name, arr, shape in (("cls_state", cls_state, (n, cls.channels)), ("cls_attn", cls_attn, (n, cls.tokens))):
            if arr is None or np.shape(arr) != shape:
                raise ValueError(
                    f"{name}: expected shape {shape} from teacher {cls.name}, got "
                    f"{None if arr is None else np.shape(arr)}"
                )
        return feats, np.asarray(cls_state), np.asarray(cls_attn)

    def _validated_features(self, keys, features):
        m, n = self.manifest, len(keys)
        missing, extra = set(m.teacher_names) - set(features), set(features) - set(m.teacher_names)
        if missing or extra:
            raise ValueError(
                f"features must hold exactly the teachers {list(m.teacher_names)}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        feats = {}
        for t in m.teachers:
            x = np.asarray(features[t.name])
            if x.shape != (n, t.tokens, t.channels):
                raise ValueError(f"teacher {t.name}: features shape {x.shape}, expected {(n, t.tokens, t.channels)}")
            feats[t.name] = x
        return feats

    def _check_values(self, keys, feats, cls_state, cls_attn, failed, nonfinite) -> None:
        if nonfinite not in ("raise", "mark_failed"):
            raise ValueError(f"nonfinite must be 'raise' or 'mark_failed', got {nonfinite!r}")
        named = [(f"teacher {k}", v) for k, v in feats.items()]
        named += [(n, a[:, None, :]) for n, a in (("cls_state", cls_state), ("cls_attn", cls_attn)) if a is not None]
        for what, x in named:
            try:
                check_finite(x, what)
            except NonFiniteError as e:
                bad = [keys[r] for r in e.rows if keys[r] not in failed]
                if bad and nonfinite == "raise":
                    raise ValueError(f"{what} produced NaN/Inf for image(s) {bad[:10]}") from None
                for k in bad:
                    failed[k] = f"{what} produced NaN/Inf"


def _with_alpha(manifest: CacheManifest, alphas: Mapping) -> CacheManifest:
    """``manifest`` with each teacher's ``preprocess.alpha`` taken from ``alphas["teachers"]``."""
    teachers = tuple(
        dataclasses.replace(
            t, preprocess=dataclasses.replace(t.preprocess, alpha=alphas["teachers"].get(t.name, t.preprocess.alpha))
        )
        for t in manifest.teachers
    )
    return dataclasses.replace(manifest, teachers=teachers)


def _wait_for_arrays(loc: Location, manifest: CacheManifest) -> None:
    """Wait (up to ``CREATE_WAIT_S``) until every array's metadata exists: a driver that found the
    group a moment after another one created it must not write before the arrays are there."""
    deadline = time.monotonic() + CREATE_WAIT_S
    for spec in array_specs(manifest):
        while not loc.exists(f"{spec.path}/zarr.json"):
            if time.monotonic() > deadline:
                raise CacheError(
                    f"{loc.url}: array {spec.path} is missing (the driver that created this cache died while "
                    f"creating it?); delete the cache and rerun"
                )
            time.sleep(0.1)
