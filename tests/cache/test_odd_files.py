"""Odd files in a cache never make it unreadable: stray or non-numeric marker names are ignored
with a warning, a malformed, out-of-range or duplicating marker hides only its own shard and is
reported by ``verify`` with its file name, and a manifest edited to fewer shards reads what it
still describes. (Before: IndexError/ValueError tracebacks, or the whole cache refused.)"""

from __future__ import annotations

import json
import logging

import pytest
import zarr

from cache import open_cache, verify_cache
from cache.layout import marker_name
from cache.manifest import ATTRS_KEY
from tests.cache.synth import build_cache, make_manifest


@pytest.fixture
def cache_dir(tmp_path):
    build_cache(tmp_path / "c", make_manifest())
    return tmp_path / "c"


def _keys(cache_dir, shard):
    return json.loads((cache_dir / marker_name(shard)).read_text())["keys"]


def test_stray_and_non_numeric_names_are_ignored_with_a_warning(cache_dir, caplog):
    commits = cache_dir / "_commits"
    (commits / "shard-abcde.json").write_text("{}")
    (commits / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="cache.reader"):
        cache = open_cache(cache_dir)
    assert cache.complete and sorted(cache.ignored_files) == ["notes.txt", "shard-abcde.json"]
    assert "not commit markers" in caplog.text and "shard-abcde.json" in caplog.text
    report = verify_cache(cache_dir, progress=False)
    assert report.ok and "_commits/shard-abcde.json: not a commit marker, ignored" in report.notes


def test_an_out_of_range_marker_is_reported_and_the_rest_reads(cache_dir):
    m = make_manifest()
    bogus = json.loads((cache_dir / marker_name(0)).read_text()) | {"shard": 99999, "keys": ["zz"], "count": 1}
    (cache_dir / marker_name(99999)).write_text(json.dumps(bogus))
    cache = open_cache(cache_dir)
    assert cache.complete and "zz" not in cache
    assert "outside the manifest" in cache.marker_problems["shard-99999.json"]
    cache.read([k for k in _keys(cache_dir, 0) if cache.is_valid(k)])
    report = verify_cache(cache_dir, progress=False)
    assert report.problems == [
        f"_commits/shard-99999.json: unusable commit marker (shard 99999 is outside the manifest's "
        f"0..{m.num_shards}); its shard is not readable"
    ]


def test_one_malformed_marker_hides_only_its_shard(cache_dir):
    (cache_dir / marker_name(1)).write_text('{"marker_version": 1, "shard": 1')  # torn JSON
    cache = open_cache(cache_dir)
    assert 1 not in cache.commits and sorted(cache.commits) == [0, 2, 3]
    valid0 = [k for k in _keys(cache_dir, 0) if cache.is_valid(k)]
    assert cache.read(valid0).features["eva"].shape[0] == len(valid0)
    problems = verify_cache(cache_dir, progress=False).problems
    assert problems[0].startswith("_commits/shard-00001.json: unusable commit marker")
    assert "shard 00001 (data shard): not committed" in problems[1]


def test_a_marker_repeating_another_shards_key_hides_only_itself(cache_dir):
    path = cache_dir / marker_name(1)
    marker = json.loads(path.read_text())
    marker["keys"][0] = _keys(cache_dir, 0)[0]
    path.write_text(json.dumps(marker))
    cache = open_cache(cache_dir)
    assert 1 not in cache.commits and "duplicate image" in cache.marker_problems["shard-00001.json"]


def test_a_manifest_edited_to_fewer_shards_reads_what_it_describes(cache_dir):
    group = zarr.open_group(str(cache_dir), mode="r+")
    attrs = group.attrs.asdict()[ATTRS_KEY]
    attrs["num_shards"] = attrs["num_shards"] - 1
    group.attrs[ATTRS_KEY] = attrs
    cache = open_cache(cache_dir)  # was IndexError in shard_rows
    assert 0 in cache.commits and cache.marker_problems  # the old last shard and no-image row are reported
    report = verify_cache(cache_dir, progress=False)
    assert not report.ok and any("unusable commit marker" in p for p in report.problems)


def test_the_writer_ignores_stray_marker_names(cache_dir):
    from cache import CacheWriter

    (cache_dir / "_commits" / "shard-abcde.json").write_text("{}")
    (cache_dir / "_commits" / "shard-99999.json").write_text("{}")
    writer = CacheWriter.open(cache_dir, make_manifest())
    assert writer.committed_shards() == set(range(make_manifest().num_shards + 1))
