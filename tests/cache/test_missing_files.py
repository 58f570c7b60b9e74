"""No silent zeros: a committed shard whose zarr shard file is missing or truncated is an error at
read time naming the shard, the file and the repair (zarr alone reads the gap as its fill value,
and training ran on those zeros). Markers record each file's size; older markers without sizes
get an existence check; a shard whose images all failed legitimately has no files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cache import CacheWriter, open_cache
from cache.layout import marker_name
from cache.reader import CacheError
from tests.cache.synth import build_cache, make_manifest, shard_keys

EVA = "teachers/eva/values/c/1/0/0"  # bf16 eva values of cache shard 1


def _valid_keys(cache, shard):
    return [k for k in cache.commits[shard].keys if cache.is_valid(k)]


@pytest.fixture
def cache_dir(tmp_path):
    build_cache(tmp_path / "c", make_manifest(), with_failed=False)
    return tmp_path / "c"


def test_markers_record_the_size_of_every_shard_file(cache_dir):
    marker = json.loads((cache_dir / marker_name(1)).read_text())
    assert marker["files"][EVA] == os.path.getsize(cache_dir / EVA) > 0
    aux = {"aux/cls_state", "aux/cls_attn"}  # one per-row dimension; teacher components have two
    assert set(marker["files"]) == {f"{p}/c/1/0" + ("" if p in aux else "/0") for p in marker["checksums"]}
    assert all((cache_dir / k).stat().st_size == v for k, v in marker["files"].items())


def test_a_missing_shard_file_is_an_error_naming_shard_file_and_repair(cache_dir):
    os.unlink(cache_dir / EVA)
    cache = open_cache(cache_dir)
    keys = _valid_keys(cache, 1)
    with pytest.raises(CacheError) as e:
        cache.read(keys[:1], teachers=["eva"])
    msg = str(e.value)
    assert "shard 00001 is damaged" in msg and EVA in msg and "is missing" in msg
    assert "movekd cache verify" in msg and "movekd extract" in msg
    cache.read(_valid_keys(cache, 0), teachers=["eva"])  # other shards stay readable
    cache.read(keys, teachers=["clip", "convnext"])  # and the shard's other arrays


def test_a_truncated_shard_file_is_an_error_with_both_sizes(cache_dir):
    size = os.path.getsize(cache_dir / EVA)
    with open(cache_dir / EVA, "r+b") as f:
        f.truncate(size // 2)
    cache = open_cache(cache_dir)
    with pytest.raises(CacheError, match=rf"has {size // 2} bytes, but its commit marker recorded {size} bytes"):
        cache.read(_valid_keys(cache, 1), teachers=["eva"])


def test_a_marker_without_sizes_still_refuses_a_missing_file(cache_dir):
    path = cache_dir / marker_name(1)
    marker = json.loads(path.read_text())
    del marker["files"]  # as written before sizes were recorded
    path.write_text(json.dumps(marker))
    os.unlink(cache_dir / EVA)
    cache = open_cache(cache_dir)
    with pytest.raises(CacheError, match="is missing but the shard has valid images"):
        cache.read(_valid_keys(cache, 1), teachers=["eva"])


def test_a_shard_whose_images_all_failed_has_no_files_and_reads(tmp_path):
    """zarr writes no file for all-zero data: recorded as 0 bytes, read back as the zero rows."""
    m = make_manifest()
    writer = CacheWriter.create(tmp_path / "c", m)
    keys = shard_keys(m, 0)
    feats = {t.name: np.zeros((len(keys), t.tokens, t.channels), np.float32) for t in m.teachers}
    cls = m.teacher(m.cls_teacher)
    writer.write_shard(
        0,
        keys,
        feats,
        np.zeros((len(keys), cls.channels), np.float32),
        np.zeros((len(keys), cls.tokens), np.float32),
        failed=dict.fromkeys(keys, "decode error"),
    )
    marker = json.loads((tmp_path / "c" / marker_name(0)).read_text())
    assert set(marker["files"].values()) == {0} and not (tmp_path / "c" / "teachers/eva/values/c/0/0/0").exists()
    batch = open_cache(tmp_path / "c").read(keys, allow_invalid=True)
    assert not batch.valid.any() and not batch.features["eva"].any()


def test_a_file_that_cannot_be_decoded_names_the_array_and_shard(cache_dir):
    """Same size, garbage bytes (the index CRC fails): an error naming array, shard and repair."""
    size = os.path.getsize(cache_dir / EVA)
    (cache_dir / EVA).write_bytes(b"\x00" * size)
    cache = open_cache(cache_dir)
    with pytest.raises(CacheError, match=r"teachers/eva/values cannot be decoded in shard\(s\) \[1\]"):
        cache.read(_valid_keys(cache, 1), teachers=["eva"])


def test_verify_names_the_missing_file(cache_dir):
    from cache import verify_cache

    os.unlink(cache_dir / EVA)
    report = verify_cache(cache_dir, progress=False)
    assert not report.ok
    assert any("shard 00001" in p and EVA in p and "is missing" in p for p in report.problems), report.problems
