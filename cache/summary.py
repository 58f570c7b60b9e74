"""What a cache holds and what it costs on disk: ``movekd cache inspect``'s data and its text.

``inspect_cache(cache) -> dict`` (also what ``inspect --json`` prints) lists every file under the
cache once and sorts its bytes into parts that add up to the total:

- ``image_rows``: the zarr shard files of the committed data shards (teachers and ``aux/``);
- ``no_image_row``: the files of the reserved last shard (the no-image row, committed);
- ``uncommitted_shards``: shard files without a usable commit marker (a writer died, or is writing);
- ``metadata``: ``zarr.json`` files, commit markers, claims, ``stats.json``, anything else;
- ``reports``: ``_reports/`` (what ``movekd extract`` writes after a run).

Bytes per image are ``image_rows`` over the committed data rows (failed rows included: they occupy
rows too), so neither the no-image row nor the metadata inflates them on a small cache; per teacher
likewise, and the teachers' and ``aux/``'s per-image bytes sum to the cache's. "x raw bf16"
compares them with tokens x channels x 2 bytes, the teachers' outputs uncompressed (the cache's
ratio includes aux/, a teacher's does not).

The text fits 100 columns: one table of what sizes a teacher (grid, channels, codec, bytes), then
each teacher's provenance (source, tapped layer, preprocessing) as wrapped lines; ``--json`` has
every field.
"""

from __future__ import annotations

import os
import re

from cache.layout import STATS_FILE, TEACHERS, array_specs
from cache.manifest import FORMAT_NAME, TeacherEntry
from cache.reader import FeatureCache
from cache.store import Location
from cache.text import field_lines, human_bytes, preprocess_summary, table

REPORTS = "_reports"
WIDTH = 100
_SHARD_TAIL = re.compile(r"(\d+)(?:/0)*")  # what follows "<array>/c/" in a zarr shard file's key
PARTS = ("image_rows", "no_image_row", "uncommitted_shards", "metadata", "reports")


def inspect_cache(cache: FeatureCache) -> dict:
    """Everything ``inspect`` reports, as a JSON-ready dict."""
    m = cache.manifest
    data_keys = [k for s in cache.committed_shards for k in cache.commits[s].keys]
    failed = sum(1 for k in data_keys if not cache.is_valid(k))
    rows = len(data_keys)
    files = file_sizes(cache.location)
    parts, per_array = _bytes_by_part(cache, files)
    raw = sum(t.tokens * t.channels * 2 for t in m.teachers)
    return {
        "location": cache.location.url,
        "manifest": {
            "format": FORMAT_NAME,
            "format_version": m.format_version,
            "null_input": m.null_input,
            "dataset_name": m.dataset_name,
            "dataset_fingerprint": m.dataset_fingerprint,
            "created": m.created,
            "package_version": m.package_version,
            "num_shards": m.num_shards,
            "shard_size": m.shard_size,
            "cls_teacher": m.cls_teacher,
            "notes": dict(m.notes),
        },
        "teachers": [_teacher_info(cache, t, rows, per_array, files) for t in m.teachers],
        "aux": _aux_info(per_array, rows) if m.cls_teacher is not None else None,
        "images": {"valid": rows - failed, "failed": failed, "total": rows},
        "shards": {
            "committed": len(cache.committed_shards),
            "total": m.num_shards,
            "null_row_committed": m.num_shards in cache.commits,
        },
        "bytes_on_disk": sum(parts.values()),
        "bytes": parts,
        "bytes_per_image": _per(parts["image_rows"], rows),
        "raw_bf16_bytes_per_image": raw,
        "ratio_to_raw_bf16": _per(parts["image_rows"], rows * raw),
        "has_channel_stats": cache.location.exists(STATS_FILE),
    }


def _per(n: int, d: int) -> float | None:
    return n / d if d else None


def _bytes_by_part(cache: FeatureCache, files: dict[str, int]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(bytes per part, {array path: {"image_rows"|"no_image_row"|"uncommitted_shards": bytes}})."""
    m = cache.manifest
    arrays = {spec.path for spec in array_specs(m)}
    parts = dict.fromkeys(PARTS, 0)
    per_array = {path: dict.fromkeys(PARTS[:3], 0) for path in arrays}
    for rel, size in files.items():
        head, sep, tail = rel.rpartition("/c/")
        match = _SHARD_TAIL.fullmatch(tail) if sep and head in arrays else None
        if match is None:
            parts["reports" if rel.startswith(f"{REPORTS}/") else "metadata"] += size
            continue
        shard = int(match.group(1))
        if shard not in cache.commits:
            part = "uncommitted_shards"
        else:
            part = "no_image_row" if shard == m.num_shards else "image_rows"
        parts[part] += size
        per_array[head][part] += size
    return parts, per_array


def file_sizes(loc: Location) -> dict[str, int]:
    """``{path relative to the root: bytes}`` of every file under ``loc``: one walk locally, one
    recursive listing (with sizes) on an fsspec store."""
    if "://" in loc.zarr_path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(loc.zarr_path)
        root = root.rstrip("/")
        found = fs.find(root, detail=True) if fs.exists(root) else {}
        return {p[len(root) :].lstrip("/"): int(i["size"]) for p, i in found.items() if i.get("type") != "directory"}
    out = {}
    for dirpath, _, files in os.walk(loc.zarr_path):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, loc.zarr_path).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def _sum_parts(per_array: dict, prefix: str) -> dict[str, int]:
    mine = [v for path, v in per_array.items() if path.startswith(prefix)]
    return {part: sum(v[part] for v in mine) for part in PARTS[:3]}


def _aux_info(per_array: dict, rows: int) -> dict:
    b = _sum_parts(per_array, "aux/")
    return {
        "bytes_image_rows": b["image_rows"],
        "bytes_no_image_row": b["no_image_row"],
        "bytes_per_image": _per(b["image_rows"], rows),
    }


def _teacher_info(cache: FeatureCache, t: TeacherEntry, rows: int, per_array: dict, files: dict) -> dict:
    b = _sum_parts(per_array, f"{TEACHERS}/{t.name}/")
    raw = t.tokens * t.channels * 2
    return {
        "name": t.name,
        "family": t.family,
        "source": t.source,
        "layer": t.layer,
        "weights_fingerprint": t.weights_fingerprint,
        "tokens": t.tokens,
        "grid": list(t.grid),
        "channels": t.channels,
        "codec": t.codec,
        "compute_dtype": t.compute_dtype,
        "resample": t.resample,
        "native_grid": list(t.native_grid) if t.native_grid else None,
        "has_cls": t.has_cls,
        "is_cls_teacher": t.name == cache.manifest.cls_teacher,
        "preprocess": t.preprocess.to_dict(),
        "preprocess_summary": preprocess_summary(t.preprocess),
        "bytes_on_disk": sum(n for rel, n in files.items() if rel.startswith(f"{TEACHERS}/{t.name}/")),
        "bytes_image_rows": b["image_rows"],
        "bytes_no_image_row": b["no_image_row"],
        "bytes_per_image": _per(b["image_rows"], rows),
        "raw_bf16_bytes_per_image": raw,
        "ratio_to_raw_bf16": _per(b["image_rows"], rows * raw),
    }


# -- text --------------------------------------------------------------------------------------


def _size(n: float | None) -> str:
    return "-" if n is None else human_bytes(n)


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}"


def format_inspect(info: dict) -> str:
    man, img, sh, b = info["manifest"], info["images"], info["shards"], info["bytes"]
    null = ("committed" if sh["null_row_committed"] else "NOT committed") + f" ({man['null_input']} input)"
    if man["null_input"] != "black":
        null += ", not the released black input: `movekd extract --rewrite-null-row` (cache/FORMAT.md section 2)"
    size = f"{human_bytes(info['bytes_on_disk'])} on disk = image rows {human_bytes(b['image_rows'])}"
    size += f" + no-image row {human_bytes(b['no_image_row'])}"
    if b["uncommitted_shards"]:
        size += f" + uncommitted shards {human_bytes(b['uncommitted_shards'])}"
    size += f" + metadata/reports {human_bytes(b['metadata'] + b['reports'])}"
    per_image = (
        f"{_size(info['bytes_per_image'])} (image rows / {img['total']} rows, failed included), "
        f"{_ratio(info['ratio_to_raw_bf16'])} x raw bf16 ({human_bytes(info['raw_bf16_bytes_per_image'])})"
    )
    made = f"movekd {man['package_version']}, created {man['created']}"
    header = [
        ("format", f"{man['format']} v{man['format_version']} ({made})"),
        ("dataset", f"{man['dataset_name'] or '-'} (fingerprint {man['dataset_fingerprint']})"),
        ("shards", f"{sh['committed']}/{sh['total']} committed, {man['shard_size']} rows each; no-image row {null}"),
        ("images", f"{img['valid']} valid, {img['failed']} failed"),
        ("size", size),
        ("per image", per_image),
        ("stats", "stats.json present" if info["has_channel_stats"] else "none (run: movekd cache stats PATH)"),
    ]
    lines = [f"cache     {info['location']}"]  # a location is printed whole, however long
    for label, text in header:
        lines += field_lines(label, text, WIDTH, 10)
    lines += ["", _teacher_table(info), "", *_provenance(info["teachers"])]
    return "\n".join(lines)


def _teacher_table(info: dict) -> str:
    rows = [
        [
            t["name"] + ("*" if t["is_cls_teacher"] else ""),
            t["family"],
            "x".join(map(str, t["grid"])),
            str(t["channels"]),
            t["codec"],
            t["resample"] + (f" from {'x'.join(map(str, t['native_grid']))}" if t["native_grid"] else ""),
            _size(t["bytes_per_image"]),
            _ratio(t["ratio_to_raw_bf16"]),
        ]
        for t in info["teachers"]
    ]
    if info["aux"] is not None:
        rows.append(["aux", "-", "-", "-", "-", "-", _size(info["aux"]["bytes_per_image"]), "-"])
    text = table(["teacher", "family", "grid", "channels", "codec", "resample", "disk/img", "x bf16"], rows)
    if info["aux"] is not None:
        text += "\n* cls teacher: its [CLS] state and attention per image are in aux/"
    return text


def _provenance(teachers: list[dict]) -> list[str]:
    width = max(len(t["name"]) + 1 for t in teachers) + 2
    lines = [f"{'teacher':<{width}}provenance"]
    for t in teachers:
        name = t["name"] + ("*" if t["is_cls_teacher"] else "")
        for i, (label, text) in enumerate(
            (("source", t["source"] or "-"), ("layer", t["layer"]), ("input", t["preprocess_summary"]))
        ):
            prefix = (name if i == 0 else "").ljust(width)
            lines += [prefix + line for line in field_lines(label, text, WIDTH - width, 7)]
    return lines
