"""``verify`` checks the arrays against the manifest and the markers' field types: an edited
``channels``/``shard_size``, keys given as a string or a zero-row marker are reported by name
(before: they verified clean or crashed with ``cannot reshape array of size 0``)."""

from __future__ import annotations

import json

import pytest
import zarr

from cache import verify_cache
from cache.layout import marker_name
from cache.manifest import ATTRS_KEY
from tests.cache.synth import build_cache, make_manifest


@pytest.fixture
def cache_dir(tmp_path):
    build_cache(tmp_path / "c", make_manifest())
    return tmp_path / "c"


def _edit_manifest(cache_dir, fn):
    group = zarr.open_group(str(cache_dir), mode="r+")
    attrs = group.attrs.asdict()[ATTRS_KEY]
    fn(attrs)
    group.attrs[ATTRS_KEY] = attrs


def test_edited_channels_are_reported_per_array(cache_dir):
    def edit(a):
        eva = next(t for t in a["teachers"] if t["name"] == "eva")
        eva["channels"] = eva["channels"] * 2

    _edit_manifest(cache_dir, edit)
    report = verify_cache(cache_dir, progress=False)
    bad = [p for p in report.problems if p.startswith("teachers/eva/values: does not match the manifest")]
    assert bad and "shape" in bad[0] and "chunks" in bad[0], report.problems


def test_edited_shard_size_is_reported(cache_dir):
    _edit_manifest(cache_dir, lambda a: a.update(shard_size=a["shard_size"] * 2, num_shards=a["num_shards"] // 2))
    report = verify_cache(cache_dir, progress=False)
    assert any("does not match the manifest" in p and "shards" in p for p in report.problems), report.problems


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda m: m.update(keys="abc", count=3), "'keys' must be a list of non-empty strings, got str"),
        (lambda m: m.update(keys=[], count=0, failed={}), "no keys"),
        (lambda m: m.update(checksums=["x"]), "'checksums' must map strings to strings"),
        (lambda m: m.update(count="4"), "'shard' and 'count' must be integers"),
    ],
    ids=["keys_as_string", "zero_rows", "checksums_list", "count_string"],
)
def test_malformed_marker_fields_are_reported(cache_dir, edit, why):
    path = cache_dir / marker_name(1)
    marker = json.loads(path.read_text())
    edit(marker)
    path.write_text(json.dumps(marker))
    report = verify_cache(cache_dir, progress=False)
    assert any(p.startswith("_commits/shard-00001.json: unusable commit marker") and why in p for p in report.problems)
