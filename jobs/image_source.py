"""Glue between a ``movekd pack`` directory and the student's ``DistillDataset``.

- ``PackedImageSource(packed_dir)``: ``key -> PIL image`` read straight from the WebDataset tars.
- ``FolderImageSource(image_root, path_for_key)``: the same from a plain image folder.
- ``records_from_packed(packed_dir, json_path)``: the LLaVA JSON rows as ``ConversationRecord``s,
  each joined to its image key through the pack's row table.

Decisions:
- Random access into tars without extracting them: the first read from a shard scans its headers
  once (``tarfile``, headers only) into ``member -> (TarInfo.offset_data, size)``; reads are then
  one ``os.pread``. pread takes no shared file offset, so threads may share a handle; handles are
  still per process (a fork or a pickle into a DataLoader worker drops them and the next read
  reopens) and at most ``max_open`` stay open (LRU), since 665K images make ~665 shards.
- Image bytes are returned as packed (the original file); decoding is ``Image.open`` + ``load``
  and nothing else: colour conversion and resizing belong to ``cache.preprocess``, shared with
  the teachers.
- ``records_from_packed`` streams the JSON (``pipeline.llava_data.iter_json_list``, one row at a
  time) and checks its sha256 and row count against what the pack recorded, so the row table
  cannot be applied to an edited file. Rows the packer rejected (bad row, bad or missing image)
  are skipped and counted in the returned list's ``skipped`` (reason -> count, examples).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping

from PIL import Image

from cache import FeatureCache
from pipeline.llava_data import iter_json_list, resolve_inside
from pipeline.packed_dataset import SKIPPED, TEXT_ONLY, PackedDataset
from student.data import ConversationRecord, SkipLog

PACK_REJECTED = "rejected_by_pack"


def decode_image(data: bytes, what: str) -> Image.Image:
    """Decode image bytes fully (so the caller gets errors here, not later in preprocessing)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        raise ValueError(f"{what}: cannot decode the image ({type(e).__name__}: {e})") from e
    return image


class PackedImageSource:
    """``key -> PIL.Image`` from the tar shards of a finished pack (see the module docstring)."""

    def __init__(self, packed_dir: str | os.PathLike, max_open: int = 64) -> None:
        self.packed = PackedDataset(str(packed_dir))
        self.max_open = max(1, int(max_open))
        self._members: dict[int, dict[str, tuple[int, int]]] = {}
        self._reset()

    def _reset(self) -> None:
        self._pid, self._lock = os.getpid(), threading.Lock()
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_fds", "_lock", "_pid"):
            state.pop(k)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._reset()

    def __call__(self, key: str) -> Image.Image:
        return decode_image(self.read_bytes(key), f"image {key!r} in {self.packed.root}")

    def read_bytes(self, key: str) -> bytes:
        """The original bytes of image ``key``."""
        shard, member = self.packed.locate(key)
        offset, size = self._member_table(shard).get(member, (None, None))
        if offset is None:
            raise ValueError(
                f"{self.packed.shard_path(shard)} has no member {member!r} although the "
                "index places it there; the shard was replaced: re-run `movekd pack`"
            )
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ValueError(
                f"{self.packed.shard_path(shard)}: member {member!r} is cut short "
                f"({len(data)} of {size} bytes); re-run `movekd pack` to rewrite it"
            )
        return data

    def _member_table(self, shard: int) -> dict[str, tuple[int, int]]:
        table = self._members.get(shard)
        if table is None:
            path = self.packed.shard_path(shard)
            try:
                with tarfile.open(path, mode="r:") as tar:
                    table = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isreg()}
            except (OSError, tarfile.TarError) as e:
                raise ValueError(f"{path}: cannot read the tar ({e}); re-run `movekd pack`") from e
            self._members[shard] = table
        return table

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._reset()
        with self._lock:
            fd = self._fds.pop(shard, None)
            if fd is None:
                fd = os.open(self.packed.shard_path(shard), os.O_RDONLY)
                while len(self._fds) >= self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[shard] = fd
            return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._reset()


class FolderImageSource:
    """``key -> PIL.Image`` from files under ``image_root``; ``path_for_key`` maps a key to a
    relative path (a callable or a mapping). Paths may not leave the root (symlinks included)."""

    def __init__(self, image_root: str | os.PathLike, path_for_key: Callable[[str], str] | Mapping[str, str]) -> None:
        self.image_root = os.path.abspath(image_root)
        if not os.path.isdir(self.image_root):
            raise ValueError(f"image root {self.image_root} is not a directory")
        self.path_for_key = path_for_key

    def __call__(self, key: str) -> Image.Image:
        lookup = self.path_for_key
        try:
            rel = lookup[key] if isinstance(lookup, Mapping) else lookup(key)
        except KeyError:
            raise ValueError(f"image key {key!r} has no path under {self.image_root}") from None
        path = resolve_inside(self.image_root, rel)
        with open(path, "rb") as f:
            return decode_image(f.read(), f"image {key!r} ({path})")


class RecordList(list):
    """``list[ConversationRecord]`` plus ``skipped`` (reason -> count, examples) and ``source``."""

    def __init__(self, records=(), skipped: dict | None = None, source: str = "") -> None:
        super().__init__(records)
        self.skipped = skipped or {}
        self.source = source


def records_from_packed(packed_dir: str | os.PathLike, json_path: str | os.PathLike) -> RecordList:
    """Stream the LLaVA rows of ``json_path`` (one of the pack's input files) and join each to
    its image key via the pack's row table; text-only rows get ``image_key=None``."""
    packed = PackedDataset(str(packed_dir))
    name, path = os.path.basename(json_path), str(json_path)
    table = packed.row_images(name)  # raises naming the files the pack holds
    recorded = next(f for f in packed.index["files"] if f["name"] == name)
    hasher, skips, out, n_rows = hashlib.sha256(), SkipLog(), [], 0
    for i, row in enumerate(iter_json_list(path, hasher)):
        n_rows = i + 1
        if i >= len(table):
            raise ValueError(
                f"{path} has more rows than the {len(table)} the pack recorded; "
                "it changed since packing: re-run `movekd pack`"
            )
        code = int(table[i])
        if code == SKIPPED:
            rid = row.get("id") if isinstance(row, dict) else None
            skips.add(PACK_REJECTED, f"{name} row {i} (id {rid}): see {packed.root}/report.json")
            continue
        key = None if code == TEXT_ONLY else packed.key_at(code)
        out.append(ConversationRecord(str(row["id"]), name, i, row["conversations"], key))
    if hasher.hexdigest() != recorded["sha256"] or n_rows != len(table):
        raise ValueError(
            f"{path} is not the file that was packed as {name!r} (sha256 or row count "
            f"differs from {packed.root}/index.json); re-run `movekd pack` on it"
        )
    return RecordList(out, skips.as_dict(), name)


def check_pack_matches_cache(packed_dir: str | os.PathLike, cache: FeatureCache) -> None:
    """Refuse a cache extracted from another pack (its manifest records the pack's fingerprint)."""
    packed = PackedDataset(str(packed_dir))
    if cache.manifest.dataset_fingerprint != packed.fingerprint:
        raise ValueError(
            f"cache {cache.location.url} was extracted from dataset {cache.manifest.dataset_name!r} "
            f"(fingerprint {cache.manifest.dataset_fingerprint}), not from the pack at {packed.root} "
            f"({packed.name!r}, fingerprint {packed.fingerprint}); pass the matching pack and cache"
        )


__all__ = [
    "FolderImageSource",
    "PackedImageSource",
    "RecordList",
    "check_pack_matches_cache",
    "decode_image",
    "records_from_packed",
]
