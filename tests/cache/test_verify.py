"""verify_cache: a clean cache passes; missing commits, truncated or bit-flipped shard files,
NaN written behind the writer's back and unreadable markers are each reported, naming the shard
and (for data problems) the stored file."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache import verify_cache
from cache.layout import array_specs, shard_file_key
from tests.cache import synth


@pytest.fixture
def cache_path(tmp_path, manifest):
    path = tmp_path / "c"
    synth.build_cache(path, manifest)
    return path


def _shard_file(path, manifest, array: str, shard: int):
    spec = next(s for s in array_specs(manifest) if s.path == array)
    return path / shard_file_key(spec, shard), shard_file_key(spec, shard)


def test_clean_cache_verifies(cache_path):
    report = verify_cache(cache_path, sample=100, progress=False)
    assert report.ok, report.problems
    assert report.to_dict() | {"location": None} == {
        "location": None,
        "ok": True,
        "problems": [],
        "shards_total": 4,
        "shards_committed": 4,
        "shards_checked": 4,
        "rows_sampled": 11,  # 10 valid images + the no-image row
        "notes": [],
        "damaged_shards": [],
    }


def test_memory_store_cache_verifies(memory_url, manifest):
    synth.build_cache(memory_url, manifest)
    assert verify_cache(memory_url, progress=False).ok


def test_incomplete_cache_names_every_uncommitted_shard(tmp_path, manifest):
    synth.build_cache(tmp_path / "c", manifest, shards=[0, 2], null=False)
    report = verify_cache(tmp_path / "c", progress=False)
    assert not report.ok and report.shards_committed == 2
    assert report.problems == [
        "shard 00001 (data shard): not committed (extraction incomplete)",
        "shard 00003 (reserved no-image row): not committed (extraction incomplete)",
    ]


def test_truncated_shard_file_is_reported_with_its_file(cache_path, manifest):
    file, key = _shard_file(cache_path, manifest, "teachers/eva/values", 1)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    report = verify_cache(cache_path, sample=0, progress=False)
    assert not report.ok
    assert any("shard 00001" in p and "teachers/eva/values" in p and key in p for p in report.problems), report.problems
    assert all("shard 00001" in p for p in report.problems)


@pytest.mark.parametrize("where", ["data", "index"])
def test_bit_flipped_shard_file_is_reported_with_its_file(cache_path, manifest, where):
    file, key = _shard_file(cache_path, manifest, "teachers/clip/values", 2)
    synth.flip_payload_bit(file, manifest.shard_size, chunk=1, index=where == "index")
    report = verify_cache(cache_path, sample=0, progress=False)
    assert not report.ok
    hits = [p for p in report.problems if "shard 00002" in p and key in p]
    assert hits and all("shard 00002" in p for p in report.problems), report.problems


def test_values_changed_behind_the_writers_back_fail_checksum_and_nan_check(cache_path):
    arr = zarr.open_array(str(cache_path / "aux" / "cls_state"), mode="r+")
    row = arr[0:4].copy()
    row[3, 7] = np.nan
    arr[0:4] = row  # rewrites the whole zarr shard of cache shard 0
    report = verify_cache(cache_path, sample=0, progress=False)
    assert any("aux/cls_state" in p and "checksum mismatch" in p for p in report.problems)
    assert any("NaN/Inf in image 'img-000-03'" in p for p in report.problems)


def test_missing_shard_file_is_reported(cache_path, manifest):
    file, key = _shard_file(cache_path, manifest, "teachers/convnext/scale", 0)
    size = file.stat().st_size
    file.unlink()  # zarr would read it back as zeros (fill value): the recorded size catches it
    report = verify_cache(cache_path, sample=0, progress=False)
    assert report.problems == [
        f"shard 00000: teachers/convnext/scale (file {key}): shard 00000 is damaged: its data file {key} is "
        f"missing, but its commit marker recorded {size} bytes (a partial copy or a truncated write; zarr would "
        "read the gap as zeros)"
    ]


def test_unreadable_marker_and_missing_cache(cache_path, tmp_path):
    (cache_path / "_commits" / "shard-00001.json").write_text("{half a marker")
    report = verify_cache(cache_path, progress=False)
    assert not report.ok and report.problems[0].startswith("_commits/shard-00001.json: unusable commit marker")
    report = verify_cache(tmp_path / "nothing", progress=False)
    assert report.problems[0].startswith("cannot open: no cache at")
