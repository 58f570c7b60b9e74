"""Commit markers: the small JSON file that makes one shard's rows visible.

A marker is written last (atomically) by the writer and read by every reader; it records the
shard's keys in row order, the failed keys with reasons, a checksum of every array's stored
rows, and the byte size of every zarr shard file it committed (so a reader can tell a missing or
truncated file from zarr's fill value without reading it). It lives in its own module because
the writer, the reader and ``verify`` all use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

NULL_KEY = "__no_image__"
MARKER_VERSION = 1


def checksum(a: np.ndarray) -> str:
    """blake2b-128 of the array's C-order bytes, little-endian whatever the host."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return "blake2b:" + hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class ShardCommit:
    """What a commit marker records (also returned by ``write_shard``)."""

    shard: int
    keys: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    written_at: str = ""
    writer: str = ""
    files: dict[str, int] = field(default_factory=dict)  # zarr shard file key -> bytes (0: no file)

    @property
    def count(self) -> int:
        """Rows the shard holds (its keys, failed ones included)."""
        return len(self.keys)

    def to_dict(self) -> dict:
        return {
            "marker_version": MARKER_VERSION,
            "shard": self.shard,
            "count": len(self.keys),
            "keys": self.keys,
            "failed": self.failed,
            "checksums": self.checksums,
            "written_at": self.written_at,
            "writer": self.writer,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ShardCommit:
        """Validate a marker read from storage (ValueError says what is wrong)."""
        if not isinstance(d, Mapping):
            raise ValueError("a commit marker must be a JSON object")
        if d.get("marker_version") != MARKER_VERSION:
            raise ValueError(
                f"commit marker version {d.get('marker_version')!r} is not supported "
                f"(this movekd reads {MARKER_VERSION})"
            )
        missing = [k for k in ("shard", "count", "keys", "failed", "checksums") if k not in d]
        if missing:
            raise ValueError(f"commit marker of shard {d.get('shard')} lacks {missing}")
        where = f"commit marker of shard {d['shard']}"
        if not _is_int(d["shard"]) or d["shard"] < 0 or not _is_int(d["count"]):
            raise ValueError(f"{where}: 'shard' and 'count' must be integers >= 0")
        if not isinstance(d["keys"], list) or not all(isinstance(k, str) and k for k in d["keys"]):
            raise ValueError(f"{where}: 'keys' must be a list of non-empty strings, got {type(d['keys']).__name__}")
        if not d["keys"]:
            raise ValueError(f"{where}: no keys (a committed shard holds at least one row)")
        if len(set(d["keys"])) != len(d["keys"]):
            raise ValueError(f"{where}: duplicate keys")
        if d["count"] != len(d["keys"]):
            raise ValueError(f"{where}: count {d['count']} != {len(d['keys'])} keys")
        for name in ("failed", "checksums"):
            if not isinstance(d[name], Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in d[name].items()
            ):
                raise ValueError(f"{where}: {name!r} must map strings to strings")
        if set(d["failed"]) - set(d["keys"]):
            raise ValueError(f"{where}: failed keys {sorted(set(d['failed']) - set(d['keys']))[:5]} are not its keys")
        files = d.get("files", {})  # absent in markers written before file sizes were recorded
        if not isinstance(files, Mapping) or not all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in files.items()
        ):
            raise ValueError(f"{where}: 'files' must map file keys to byte sizes >= 0")
        return cls(
            int(d["shard"]),
            list(d["keys"]),
            dict(d["failed"]),
            dict(d["checksums"]),
            d.get("written_at", ""),
            d.get("writer", ""),
            dict(files),
        )
