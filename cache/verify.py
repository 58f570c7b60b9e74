"""Integrity checks of a cache: completeness, checksums, decodability, NaN/Inf, sample decode.

Every problem is one line that names the shard, the array and (where it applies) the stored
shard file or image key, so a person can re-extract exactly what is broken. ``verify`` reads every
committed shard of every array once (checksums are over the stored values), then decodes a random
sample of rows through the normal reader path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from cache.codecs import bf16_bits_to_float
from cache.layout import COMMITS, MARKER_NAME, array_specs, shard_file_key
from cache.marker import checksum
from cache.reader import CacheError, FeatureCache


@dataclass
class VerifyReport:
    location: str
    problems: list[str] = field(default_factory=list)
    shards_total: int = 0
    shards_committed: int = 0
    shards_checked: int = 0
    rows_sampled: int = 0
    notes: list[str] = field(default_factory=list)  # harmless findings (stray files), not problems
    damaged: dict[int, list[str]] = field(default_factory=dict)  # shard -> its problems (what --repair redoes)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "location": self.location,
            "ok": self.ok,
            "problems": self.problems,
            "shards_total": self.shards_total,
            "shards_committed": self.shards_committed,
            "shards_checked": self.shards_checked,
            "rows_sampled": self.rows_sampled,
            "notes": self.notes,
            "damaged_shards": sorted(self.damaged),
        }


def verify_cache(location: str | os.PathLike, sample: int = 16, seed: int = 0, progress: bool = True) -> VerifyReport:
    report = VerifyReport(str(location))
    try:
        cache = FeatureCache(location)
    except (CacheError, ValueError) as e:
        report.problems.append(f"cannot open: {e}")
        return report
    m = cache.manifest
    report.shards_total = m.num_shards + 1
    report.shards_committed = len(cache.commits)
    for name, why in sorted(cache.marker_problems.items()):
        problem = f"{COMMITS}/{name}: unusable commit marker ({why}); its shard is not readable"
        report.problems.append(problem)
        shard = int(MARKER_NAME.fullmatch(name).group(1))
        if shard <= m.num_shards:  # outside the manifest: nothing to re-extract
            report.damaged.setdefault(shard, []).append(problem)
    report.notes += [f"{COMMITS}/{name}: not a commit marker, ignored" for name in cache.ignored_files]
    for shard in range(m.num_shards + 1):
        if shard not in cache.commits:
            what = "reserved no-image row" if shard == m.num_shards else "data shard"
            report.problems.append(f"shard {shard:05d} ({what}): not committed (extraction incomplete)")
    specs = [spec for spec in array_specs(m) if not _check_array(cache, spec, report.problems)]
    for shard in tqdm(sorted(cache.commits), desc="verify shards", unit="shard", disable=not progress):
        problems = _check_shard(cache, shard, specs)
        if problems:
            report.problems += problems
            report.damaged.setdefault(shard, []).extend(problems)
        report.shards_checked += 1
    report.rows_sampled = _check_sample(cache, sample, seed, report.problems)
    return report


def damaged_shards(location: str | os.PathLike, progress: bool = False) -> dict[int, list[str]]:
    """The shards ``verify`` finds damaged (unusable marker, missing/truncated file, checksum or
    decode failure, NaN/Inf in a valid row), each with its problems: what ``movekd extract
    --repair`` re-extracts. Raises CacheError when the cache itself cannot be opened."""
    report = verify_cache(location, sample=0, progress=progress)
    if report.problems and report.problems[0].startswith("cannot open: "):
        raise CacheError(report.problems[0])
    return report.damaged


def _check_array(cache: FeatureCache, spec, problems: list[str]) -> bool:
    """Append what is wrong with the array itself (shape, dtype, chunking vs the manifest); True
    when something is (its shards are then not checked: their rows would not mean what the
    manifest says)."""
    m = cache.manifest
    try:
        arr = cache.array(spec.path)
    except CacheError:
        problems.append(f"{spec.path}: array missing (the manifest lists it)")
        return True
    want = {
        "shape": (m.num_rows, *spec.per_row),
        "dtype": np.dtype(spec.dtype),
        "chunks": (1, *spec.per_row),
        "shards": (m.shard_size, *spec.per_row),
    }
    have = {"shape": arr.shape, "dtype": arr.dtype, "chunks": arr.chunks, "shards": arr.shards}
    bad = [f"{k} {have[k]} (manifest: {want[k]})" for k in want if tuple_or(have[k]) != tuple_or(want[k])]
    if bad:
        problems.append(f"{spec.path}: does not match the manifest: " + ", ".join(bad))
    return bool(bad)


def tuple_or(v):
    return tuple(v) if isinstance(v, (tuple, list)) else v


def _check_shard(cache: FeatureCache, shard: int, specs) -> list[str]:
    marker, problems = cache.commits[shard], []
    bad_rows = np.array([k in marker.failed for k in marker.keys], dtype=bool)
    for spec in specs:
        where = f"shard {shard:05d}: {spec.path} (file {shard_file_key(spec, shard)})"
        expected = marker.checksums.get(spec.path)
        problem = cache.file_problem(spec.path, len(spec.per_row), shard)
        if problem:  # missing or truncated file: what a read refuses
            problems.append(f"{where}: {problem}")
            continue
        try:
            raw = cache.read_shard_raw(spec.path, shard)
        except Exception as e:  # noqa: BLE001 - any decode failure is a finding, not a crash
            problems.append(f"{where}: cannot be read or decoded ({type(e).__name__}: {e})")
            continue
        if expected is None:
            problems.append(f"{where}: the commit marker has no checksum for this array")
        elif checksum(raw) != expected:
            problems.append(f"{where}: checksum mismatch (stored data changed or corrupt)")
        values = _as_float(raw, spec)
        if values is not None:
            finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1) | bad_rows
            for i in np.nonzero(~finite)[0][:5]:
                problems.append(f"{where}: NaN/Inf in image {marker.keys[i]!r}")
    return problems


def _as_float(raw: np.ndarray, spec) -> np.ndarray | None:
    if spec.component == "values" and spec.dtype == "uint16":
        return bf16_bits_to_float(raw)
    return raw if np.issubdtype(raw.dtype, np.floating) else None


def _check_sample(cache: FeatureCache, sample: int, seed: int, problems: list[str]) -> int:
    valid = [k for k in cache.keys() if cache.is_valid(k)]
    if not valid or sample <= 0:
        return 0
    rng = np.random.default_rng(seed)
    keys = [valid[i] for i in rng.choice(len(valid), size=min(sample, len(valid)), replace=False)]
    for key in keys:
        try:
            batch = cache.read([key])
        except Exception as e:  # noqa: BLE001
            problems.append(f"image {key!r} (row {cache.row(key)}): decode failed ({type(e).__name__}: {e})")
            continue
        arrays = dict(batch.features, cls_state=batch.cls_state, cls_attn=batch.cls_attn)
        for name, arr in arrays.items():
            if arr is not None and not np.isfinite(arr).all():
                problems.append(f"image {key!r} (row {cache.row(key)}): {name} decodes to NaN/Inf")
    return len(keys)
