"""The on-disk layout of a packed image set, and its reader ``PackedDataset``.

``movekd pack`` writes into one directory::

    shard-00000.tar ...   WebDataset tars: per image ``{key}.{jpg|png|gif..}`` (original bytes)
                          and ``{key}.json`` (key, sha256, paths, width, height, mode, format, size)
    keys.npy, exts.npy    unique images sorted by key; position = image ordinal
    paths.npy             every accepted relative path, sorted (utf-8 bytes)
    path_image.npy        int32 ordinal of each entry of paths.npy
    rows-<j>.npy          per input JSON file, int32 per row: image ordinal, -1 text-only,
                          -2 skipped (bad row or bad image, see report.json)
    images.jsonl          one line per image in ordinal order (all metadata; for humans and tools)
    report.json           counts and every problem found
    index.json            header: name, fingerprint, shard size, shards, files, table names;
                          written last, so its presence means the pack is complete
    _progress.json        packer-internal: finished shards (resume); _checks.jsonl: check cache

Decisions:
- Shard of ordinal n is ``n // shard_size`` and images are sorted by key (first 16 hex of the
  content sha256), so placement is a pure function of the set of images: reruns and other machines
  reproduce the same shards byte for byte (tar headers carry fixed mtime/owner).
- Lookup tables are numpy arrays, not one big JSON: at 665K scale a JSON index is ~150 MB of
  Python dicts in every DataLoader worker; ``np.load(mmap_mode="r")`` arrays are a few MB, shared
  between processes, and give O(log n) path lookups via ``searchsorted``. ``images.jsonl`` keeps
  the full metadata greppable, line n = ordinal n.
- The tars follow WebDataset's conventions (``webdataset.WebDataset(url)`` reads them; a test
  checks), but this module reads and writes them with ``tarfile``: ``import webdataset`` imports
  torch, and packing/reading must stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator

import numpy as np

from pipeline.image_checks import DEFAULT_MAX_PIXELS, allow_pixels
from pipeline.llava_data import normalize_image_path

FORMAT_NAME = "movekd-packed-images"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REPORT_NAME = "report.json"
TEXT_ONLY = -1
SKIPPED = -2
KEY_HEX = 16


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.tar"


def dataset_fingerprint(keys: list[str], shard_size: int) -> str:
    """sha256 over the sorted keys and the shard size: what a feature cache is built from."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode() + b"\n")
    h.update(f"shard_size={shard_size}\n".encode())
    return h.hexdigest()


def file_sha256(path: str, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a WebDataset tar: yield ``(key, {ext: bytes})`` per run of members sharing a key."""
    key, group = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            base = info.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and group:
                yield key, group
                group = {}
            key = k
            group[ext] = tar.extractfile(info).read()
    if group:
        yield key, group


class PackedDataset:
    """Read-only view of a finished pack (``index.json`` present and of a known version)."""

    def __init__(self, out_dir: str) -> None:
        self.root = os.path.abspath(out_dir)
        index_path = os.path.join(self.root, INDEX_NAME)
        if not os.path.exists(index_path):
            raise ValueError(
                f"{index_path} not found: {out_dir} is not a finished pack; "
                "run `movekd pack` (a missing index means the run did not complete)"
            )
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT_NAME or self.index.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{index_path}: format {self.index.get('format')!r} version "
                f"{self.index.get('version')!r}; this reader handles {FORMAT_NAME} "
                f"v{FORMAT_VERSION}. Re-pack with this version of movekd."
            )
        # The pack's pixel limit: its images decode without Pillow's bomb warning in this process.
        allow_pixels(self.max_pixels)
        tables = self.index["tables"]
        self.keys, self.exts, self.paths, self.path_image = (
            np.load(os.path.join(self.root, tables[t]), mmap_mode="r") for t in ("keys", "exts", "paths", "path_image")
        )
        self._files = {f["name"]: f for f in self.index["files"]}
        self._rows: dict[str, np.ndarray] = {}
        self._inverse: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- header --------------------------------------------------------------------------
    name = property(lambda self: self.index["name"])
    fingerprint = property(lambda self: self.index["fingerprint"])
    shard_size = property(lambda self: self.index["shard_size"])
    num_shards = property(lambda self: self.index["num_shards"])
    num_images = property(lambda self: self.index["num_images"])
    files = property(lambda self: list(self._files))
    report_path = property(lambda self: os.path.join(self.root, REPORT_NAME))
    max_pixels = property(lambda self: int(self.index.get("max_pixels", DEFAULT_MAX_PIXELS)))

    def shard_path(self, i: int) -> str:
        if not 0 <= i < self.num_shards:
            raise ValueError(f"shard {i} out of range: {self.root} has {self.num_shards} shards")
        return os.path.join(self.root, shard_name(i))

    # -- images ----------------------------------------------------------------------------
    def ordinal(self, key: str) -> int:
        """Position of ``key`` in key order; ``ValueError`` if the pack has no such image."""
        pos = int(np.searchsorted(self.keys, key.encode()))
        if pos >= len(self.keys) or self.keys[pos].decode() != key:
            raise ValueError(f"key {key!r} is not in the pack at {self.root}")
        return pos

    def key_at(self, ordinal: int) -> str:
        return self.keys[ordinal].decode()

    def locate(self, key: str) -> tuple[int, str]:
        """``(shard index, tar member name)`` of the image with ``key``."""
        n = self.ordinal(key)
        return n // self.shard_size, f"{key}.{self.exts[n].decode()}"

    def keys_in_shard(self, i: int) -> list[str]:
        self.shard_path(i)  # range check
        lo = i * self.shard_size
        return [k.decode() for k in self.keys[lo : lo + self.shard_size]]

    def key_for_path(self, relpath: str) -> str | None:
        """Key of the image at ``relpath`` (normalised like the packer did); None if not packed."""
        try:
            norm = normalize_image_path(relpath).encode()
        except ValueError:
            return None
        pos = int(np.searchsorted(self.paths, norm))
        if pos >= len(self.paths) or self.paths[pos] != norm:
            return None
        return self.key_at(int(self.path_image[pos]))

    def iter_shard(self, i: int) -> Iterator[tuple[str, bytes, dict]]:
        """Yield ``(key, image_bytes, meta)`` for every image of shard ``i``, in key order."""
        path = self.shard_path(i)
        for key, group in iter_tar_samples(path):
            images = [ext for ext in group if ext != "json"]
            if "json" not in group or len(images) != 1:
                raise ValueError(
                    f"{path}: sample {key!r} has members {sorted(group)}; expected "
                    "one image and one json. Re-run `movekd pack` to rewrite it."
                )
            yield key, group[images[0]], json.loads(group["json"])

    def read_images(self, keys: list[str]) -> list[tuple[str, bytes, dict]]:
        """``(key, image_bytes, meta)`` for each of ``keys``, in the order given (what
        ``iter_shard`` yields, for a random subset): each shard's tar is opened once and only the
        wanted members are read. ``ValueError`` names a key the pack does not hold."""
        where = {k: self.locate(k) for k in keys}
        found: dict[str, tuple[str, bytes, dict]] = {}
        for shard in sorted({s for s, _ in where.values()}):
            path = self.shard_path(shard)
            with tarfile.open(path, mode="r:") as tar:
                for key in (k for k in keys if where[k][0] == shard):
                    try:
                        data = tar.extractfile(where[key][1]).read()
                        meta = json.loads(tar.extractfile(f"{key}.json").read())
                    except KeyError:
                        raise ValueError(
                            f"{path}: sample {key!r} is missing from the tar; re-run `movekd pack` to rewrite it"
                        ) from None
                    found[key] = (key, data, meta)
        return [found[k] for k in keys]

    def verify_shard(self, i: int) -> bool:
        """True when the shard's sha256 matches the one recorded at packing time."""
        return file_sha256(self.shard_path(i)) == self.index["shards"][i]["sha256"]

    # -- rows ------------------------------------------------------------------------------
    def row_images(self, file: str) -> np.ndarray:
        """int32 per row of ``file``: image ordinal, ``TEXT_ONLY`` (-1) or ``SKIPPED`` (-2)."""
        if file not in self._files:
            raise ValueError(f"no JSON file named {file!r} in the pack; it holds {self.files}")
        if file not in self._rows:
            self._rows[file] = np.load(os.path.join(self.root, self._files[file]["rows"]), mmap_mode="r")
        return self._rows[file]

    def key_for_row(self, file: str, row: int) -> str | None:
        """Key of row ``row``'s image; None for a text-only or skipped row (see the report)."""
        n = int(self.row_images(file)[row])
        return self.key_at(n) if n >= 0 else None

    def text_only_rows(self, file: str) -> list[int]:
        return np.flatnonzero(self.row_images(file) == TEXT_ONLY).tolist()

    def rows_for_key(self, key: str, file: str | None = None) -> dict[str, list[int]]:
        """Rows (per JSON file name) that use the image ``key``."""
        n = self.ordinal(key)
        out = {}
        for name in [file] if file is not None else self.files:
            if name not in self._inverse:
                rows = self.row_images(name)
                order = np.argsort(rows, kind="stable")
                self._inverse[name] = (order, np.asarray(rows)[order])
            order, sorted_vals = self._inverse[name]
            lo, hi = np.searchsorted(sorted_vals, [n, n + 1])
            out[name] = order[lo:hi].tolist()
        return out
