"""What a cache holds and what it costs on disk: ``movekd cache inspect``'s data and its text table.

``inspect_cache(cache) -> dict`` (also what ``inspect --json`` prints) compares bytes on disk to
raw bf16 (tokens x channels x 2 bytes per teacher per image), the size the teachers' outputs would
take uncompressed; bytes per image divides by the committed data rows (failed rows included:
they occupy rows too).
"""

from __future__ import annotations

from cache.layout import STATS_FILE, TEACHERS
from cache.manifest import FORMAT_NAME, TeacherEntry
from cache.reader import FeatureCache
from cache.store import Location
from cache.text import human_bytes, preprocess_summary, table


def inspect_cache(cache: FeatureCache) -> dict:
    """Everything ``inspect`` reports, as a JSON-ready dict."""
    m = cache.manifest
    data_keys = [k for s in cache.committed_shards for k in cache.commits[s].keys]
    failed = sum(1 for k in data_keys if not cache.is_valid(k))
    rows = max(len(data_keys), 1)
    total = cache.location.size_on_disk()
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
        "teachers": [_teacher_info(cache, t, rows) for t in m.teachers],
        "images": {"valid": len(data_keys) - failed, "failed": failed, "total": len(data_keys)},
        "shards": {
            "committed": len(cache.committed_shards),
            "total": m.num_shards,
            "null_row_committed": m.num_shards in cache.commits,
        },
        "bytes_on_disk": total,
        "bytes_per_image": total / rows,
        "raw_bf16_bytes_per_image": raw,
        "ratio_to_raw_bf16": total / rows / raw,
        "has_channel_stats": cache.location.exists(STATS_FILE),
    }


def _teacher_info(cache: FeatureCache, t: TeacherEntry, rows: int) -> dict:
    size = _size_under(cache.location, f"{TEACHERS}/{t.name}")
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
        "bytes_on_disk": size,
        "bytes_per_image": size / rows,
        "raw_bf16_bytes_per_image": raw,
        "ratio_to_raw_bf16": size / rows / raw,
    }


def _size_under(loc: Location, rel: str) -> int:
    try:
        return Location(f"{loc.url.rstrip('/')}/{rel}").size_on_disk()
    except FileNotFoundError:  # an fsspec store with nothing written under rel yet
        return 0


def format_inspect(info: dict) -> str:
    man, img, sh = info["manifest"], info["images"], info["shards"]
    null = ("committed" if sh["null_row_committed"] else "NOT committed") + f" ({man['null_input']} input)"
    if man["null_input"] != "black":
        null += ", not the released black input: `movekd extract --rewrite-null-row` (cache/FORMAT.md section 2)"
    lines = [
        f"cache     {info['location']}",
        f"format    {man['format']} v{man['format_version']} (movekd {man['package_version']}, "
        f"created {man['created']})",
        f"dataset   {man['dataset_name'] or '-'} (fingerprint {man['dataset_fingerprint']})",
        f"shards    {sh['committed']}/{sh['total']} committed, {man['shard_size']} rows each; no-image row {null}",
        f"images    {img['valid']} valid, {img['failed']} failed",
        f"size      {human_bytes(info['bytes_on_disk'])} on disk, {human_bytes(info['bytes_per_image'])}/image, "
        f"{info['ratio_to_raw_bf16']:.3f} x raw bf16 ({human_bytes(info['raw_bf16_bytes_per_image'])}/image)",
        f"stats     {'stats.json present' if info['has_channel_stats'] else 'none (run: stats PATH)'}",
        "",
        _teacher_table(info["teachers"]),
    ]
    if man["cls_teacher"]:
        lines.append("* cls teacher ([CLS] state and attention stored in aux/)")
    return "\n".join(lines)


def _teacher_table(teachers: list[dict]) -> str:
    rows = [
        [
            t["name"] + ("*" if t["is_cls_teacher"] else ""),
            t["family"],
            t["source"],
            t["layer"],
            str(t["tokens"]),
            "x".join(map(str, t["grid"])),
            str(t["channels"]),
            t["codec"],
            t["resample"] + (f" from {'x'.join(map(str, t['native_grid']))}" if t["native_grid"] else ""),
            t["preprocess_summary"],
            human_bytes(t["bytes_per_image"]),
            f"{t['ratio_to_raw_bf16']:.3f}",
        ]
        for t in teachers
    ]
    return table(
        [
            "teacher",
            "family",
            "source",
            "layer",
            "tokens",
            "grid",
            "channels",
            "codec",
            "resample",
            "preprocess",
            "disk/img",
            "x bf16",
        ],
        rows,
    )
