"""Commit markers: the small JSON file that makes one shard's rows visible.

A marker is written last (atomically) by the writer and read by every reader; it records the
shard's keys in row order, the failed keys with reasons, and a checksum of every array's stored
rows. It lives in its own module because the writer, the reader and ``verify`` all use it.
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


@dataclass
class ShardCommit:
    """What a commit marker records (also returned by ``write_shard``)."""

    shard: int
    keys: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    written_at: str = ""
    writer: str = ""

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
        if d["count"] != len(d["keys"]):
            raise ValueError(f"commit marker of shard {d['shard']}: count {d['count']} != {len(d['keys'])} keys")
        return cls(
            int(d["shard"]),
            list(d["keys"]),
            dict(d["failed"]),
            dict(d["checksums"]),
            d.get("written_at", ""),
            d.get("writer", ""),
        )
