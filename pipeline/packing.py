"""Pack LLaVA JSON files + an image folder into WebDataset shards of unique images.

Teachers run once per unique image, so packing decides what an image *is*: rows are read
(``llava_data``), every distinct normalised path is checked (``image_checks``), and paths whose
bytes are identical collapse into one image keyed by the first 16 hex digits of its sha256.
The layout and the reader are in ``packed_dataset``.

Decisions:
- A bad row or a bad file is reported and skipped, never fatal. The report lists every problem
  with the first row (file, index, id) that uses the path and how many rows do. Rejected
  (the rows are marked skipped in the index): invalid_row, path_rejected, multi_image, missing,
  empty, unreadable, too_large (over ``max_pixels``). Kept, for the record: format_mismatch,
  color_mode, animated, duplicate_content, image_token.
- Identical bytes under several paths are one image; its metadata lists every path (sorted) and
  the first is where the packer reads it from. Row ids need not be unique (665K reuses them).
- ``DEFAULT_SHARD_SIZE = 1000``: ~100-200 MB tars for LLaVA-sized JPEGs, WebDataset's sweet spot.
- Images are sorted by key and cut into shards of ``shard_size``: placement depends only on the
  set of images, so a rerun reproduces the same tars.
- Resume: a shard counts as done only if ``_progress.json`` records it with the same content
  digest (its images and their metadata) and the tar on disk still has the recorded size and
  sha256. Shards are written to ``*.tar.tmp`` and renamed; leftover temps are deleted. The index
  is removed before anything is written and written (atomically) last, after the report.
- Image bytes are copied untouched; the packer re-hashes them while writing and stops with a
  ``ValueError`` if a file changed since it was checked (rerun to pick up the change).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from cache.diskfull import disk_full_as_error
from pipeline import packing_io as io_
from pipeline.image_checks import (
    DEFAULT_MAX_PIXELS,
    CheckCache,
    ImageCheck,
    allow_pixels,
    check_image,
    check_max_pixels,
)
from pipeline.llava_data import LlavaRows, Problem, read_llava_json
from pipeline.packed_dataset import (
    INDEX_NAME,
    KEY_HEX,
    REPORT_NAME,
    PackedDataset,
    dataset_fingerprint,
)

__all__ = ["DEFAULT_SHARD_SIZE", "PackResult", "PackedDataset", "pack_dataset", "format_summary"]

DEFAULT_SHARD_SIZE = 1000
DUPLICATE_CONTENT = "duplicate_content"
REJECTING = ("invalid_row", "path_rejected", "multi_image", "missing", "empty", "unreadable", "too_large")


@dataclass(frozen=True)
class PackedImage:
    """One unique image as planned: its key, where its bytes come from, its metadata."""

    key: str
    sha256: str
    ext: str
    format: str
    width: int
    height: int
    mode: str
    size: int
    paths: tuple[str, ...]

    def meta(self) -> dict:
        return {
            "key": self.key,
            "sha256": self.sha256,
            "paths": list(self.paths),
            "width": self.width,
            "height": self.height,
            "mode": self.mode,
            "format": self.format,
            "size": self.size,
        }


@dataclass
class PackResult:
    out_dir: str
    image_root: str
    name: str
    fingerprint: str
    num_images: int
    num_shards: int
    shard_size: int
    shards_written: list[int] = field(default_factory=list)
    shards_reused: list[int] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def index_path(self) -> str:
        return os.path.join(self.out_dir, INDEX_NAME)

    @property
    def report_path(self) -> str:
        return os.path.join(self.out_dir, REPORT_NAME)


def _read_inputs(json_paths: list[str]) -> list[LlavaRows]:
    names = [os.path.basename(p) for p in json_paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"--data files must have distinct names (the index keys rows by file "
            f"name); {dupes} appear more than once: rename or symlink them"
        )
    intern: dict[str, str] = {}
    files = []
    for p in json_paths:
        if not os.path.isfile(p):
            raise ValueError(f"--data {p}: no such file")
        files.append(read_llava_json(p, intern=intern))
    return files


def _path_refs(files: list[LlavaRows]) -> dict[str, list]:
    """path -> [file name, first row, its id, number of rows using the path]."""
    refs: dict[str, list] = {}
    for f in files:
        for i, p in enumerate(f.images):
            if p is None:
                continue
            ref = refs.get(p)
            if ref is None:
                refs[p] = [f.name, i, f.ids[i], 1]
            else:
                ref[3] += 1
    return refs


def _run_checks(
    paths: list[str], image_root: str, out_dir: str, workers: int, progress: bool, max_pixels: int
) -> dict[str, ImageCheck]:
    cache = CheckCache(os.path.join(out_dir, "_checks.jsonl"), image_root, max_pixels)
    try:
        results = {p: c for p in paths if (c := cache.get(p)) is not None}
        todo = [p for p in paths if p not in results]
        bar = tqdm(total=len(paths), initial=len(results), desc="check images", unit="img", disable=not progress)
        # Tasks of 16 paths, 64 tasks in flight per worker: one future per path (665K of them)
        # costs more than a cheap check; all at once would hold GBs of futures.
        tasks = [todo[i : i + 16] for i in range(0, len(todo), 16)]
        step = 64 * max(1, workers)
        check = lambda batch: [check_image(image_root, p, max_pixels) for p in batch]  # noqa: E731
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            warnings.simplefilter("ignore", UserWarning)  # Pillow's EXIF chatter, per file
            # Pillow's anonymous bomb warning: such a file is reported as too_large, by name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for start in range(0, len(tasks), step):
                for batch in pool.map(check, tasks[start : start + step]):
                    for c in batch:
                        results[c.path] = c
                        cache.put(c)
                    bar.update(len(batch))
        bar.close()
    finally:
        cache.close()
    return results


def _plan(checks: dict[str, ImageCheck]) -> tuple[list[PackedImage], dict[str, str]]:
    """Group good paths by content; return images sorted by key and path -> key."""
    by_sha: dict[str, list[ImageCheck]] = defaultdict(list)
    for c in checks.values():
        if c.ok:
            by_sha[c.sha256].append(c)
    images, path_key, seen = [], {}, {}
    for sha, group in by_sha.items():
        key = sha[:KEY_HEX]
        if key in seen:
            raise ValueError(
                f"key collision: {seen[key]} and {sha} share the prefix {key}; "
                "raise KEY_HEX in pipeline/packed_dataset.py and re-pack"
            )
        seen[key] = sha
        group.sort(key=lambda c: c.path)
        c = group[0]
        images.append(
            PackedImage(key, sha, c.ext, c.format, c.width, c.height, c.mode, c.size, tuple(g.path for g in group))
        )
        path_key.update((g.path, key) for g in group)
    images.sort(key=lambda im: im.key)
    return images, path_key


def _file_problems(refs: dict[str, list], checks: dict[str, ImageCheck], images: list[PackedImage]) -> list[Problem]:
    out = []
    for path in sorted(refs):
        name, row, rid, n = refs[path]
        c = checks[path]
        found = [(c.category, c.error)] if not c.ok else list(c.warnings)
        out += [Problem(cat, name, row, rid, path, reason, n) for cat, reason in found]
    for im in images:
        for path in im.paths[1:]:
            name, row, rid, n = refs[path]
            out.append(
                Problem(
                    DUPLICATE_CONTENT,
                    name,
                    row,
                    rid,
                    path,
                    f"same bytes as {im.paths[0]!r}; packed once as {im.key}",
                    n,
                )
            )
    return out


def _counts(
    files: list[LlavaRows],
    refs: dict,
    images: list[PackedImage],
    path_key: dict[str, str],
    problems: list[Problem],
    num_shards: int,
) -> dict:
    counts = {
        "json_files": len(files),
        "rows": sum(f.n_rows for f in files),
        "rows_with_image": sum(sum(p is not None for p in f.images) for f in files),
        "rows_text_only": sum(len(f.text_only_rows()) for f in files),
        "rows_skipped": sum(
            len(f.rejected) + sum(p is not None and p not in path_key for p in f.images) for f in files
        ),
        "unique_paths": len(refs),
        "unique_images": len(images),
        "shards": num_shards,
    }
    for p in problems:
        counts[p.category] = counts.get(p.category, 0) + 1
    return counts


def pack_dataset(
    json_paths: list[str],
    image_root: str,
    out_dir: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    name: str | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PackResult:
    """Check, dedupe and pack the images of ``json_paths`` under ``image_root`` into ``out_dir``.

    Images of more than ``max_pixels`` pixels are rejected as ``too_large`` (see ``image_checks``).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not os.path.isdir(image_root):
        raise ValueError(f"--image-root {image_root}: not a directory")
    if not json_paths:
        raise ValueError("give at least one LLaVA JSON file (--data)")
    max_pixels = check_max_pixels(max_pixels)
    allow_pixels(max_pixels)
    workers = workers or min(8, os.cpu_count() or 1)
    with disk_full_as_error(os.path.abspath(out_dir)):  # a full disk: one line with the free space
        return _pack(list(json_paths), image_root, out_dir, shard_size, workers, name, progress, max_pixels)


def _pack(json_paths, image_root, out_dir, shard_size, workers, name, progress, max_pixels) -> PackResult:
    os.makedirs(out_dir, exist_ok=True)
    files = _read_inputs(list(json_paths))
    refs = _path_refs(files)
    checks = _run_checks(sorted(refs), image_root, out_dir, workers, progress, max_pixels)
    images, path_key = _plan(checks)
    problems = [p for f in files for p in f.problems] + _file_problems(refs, checks, images)
    keys = [im.key for im in images]
    fingerprint = dataset_fingerprint(keys, shard_size)
    name = name or "+".join(os.path.splitext(f.name)[0] for f in files)
    io_.uncommit(out_dir)
    written, reused, shard_records = io_.write_shards(images, image_root, out_dir, shard_size, workers, progress)
    result = PackResult(
        os.path.abspath(out_dir),
        os.path.abspath(image_root),
        name,
        fingerprint,
        len(images),
        len(shard_records),
        shard_size,
        written,
        reused,
        max_pixels=max_pixels,
    )
    result.counts = _counts(files, refs, images, path_key, problems, len(shard_records))
    index = io_.write_tables(result, files, images, path_key, shard_records)
    io_.write_report(out_dir, result.counts, problems)
    io_.commit(out_dir, index)
    return result


def format_summary(result: PackResult) -> str:
    """The human summary ``movekd pack`` prints."""
    c = result.counts
    lines = [
        f"packed {result.name!r} into {result.out_dir}",
        f"  rows: {c['rows']} in {c['json_files']} file(s): {c['rows_with_image']} with an image, "
        f"{c['rows_text_only']} text-only, {c['rows_skipped']} skipped (see the report)",
        f"  images: {c['unique_paths']} distinct paths -> {c['unique_images']} unique images in "
        f"{result.num_shards} shard(s) of <= {result.shard_size} "
        f"({len(result.shards_written)} written, {len(result.shards_reused)} reused)",
        f"  fingerprint: {result.fingerprint}",
    ]
    cats = [
        k
        for k in c
        if k
        not in (
            "json_files",
            "rows",
            "rows_with_image",
            "rows_text_only",
            "rows_skipped",
            "unique_paths",
            "unique_images",
            "shards",
        )
    ]
    for cat in sorted(cats):
        kind = "rejected" if cat in REJECTING else "kept"
        lines.append(f"  {cat:<18} {c[cat]:>7}  ({kind})")
    lines.append(f"  details: {result.report_path}")
    return "\n".join(lines)
