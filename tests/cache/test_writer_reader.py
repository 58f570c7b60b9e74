"""Writer and reader: lookups, batch reads, subsets, dtypes, failed/uncommitted rows, the no-image
row, idempotent rewrites, worker processes, and clear errors for caches that are not what the
reader expects (edited version, plain zarr group, empty path)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import pickle

import numpy as np
import pytest
import zarr

from cache import NULL_KEY, CacheError, CacheWriter, FeatureCache, open_cache
from tests.cache import synth


@pytest.fixture(scope="module")
def expected(built_cache):
    return synth.expected_decoded(built_cache[1])


def test_lookup_by_key_returns_what_was_written(built_cache, expected):
    path, manifest = built_cache
    cache = open_cache(path)
    assert cache.complete and cache.committed_shards == [0, 1, 2]
    assert len(cache) == 4 + 4 + 3 + 1
    key = "img-001-02"
    assert cache.row(key) == 6 and key in cache and cache.is_valid(key)
    batch = cache.read([key])
    for t in manifest.teachers:
        assert batch.features[t.name].shape == (1, t.tokens, t.channels)
        np.testing.assert_array_equal(batch.features[t.name][0], expected[key][t.name])
    data = synth.shard_data(manifest, 1)
    np.testing.assert_array_equal(batch.cls_state[0], data["cls_state"][2])
    np.testing.assert_array_equal(batch.cls_attn[0], data["cls_attn"][2])


def test_batch_reads_in_any_order_with_duplicates(built_cache, expected):
    cache = open_cache(built_cache[0])
    keys = ["img-002-02", "img-000-00", "img-002-02", NULL_KEY, "img-001-03", "img-000-00"]
    batch = cache.read(keys)
    assert batch.keys == keys and batch.valid.all()
    assert list(batch.rows) == [cache.row(k) for k in keys]
    for i, key in enumerate(keys):
        for name, x in batch.features.items():
            np.testing.assert_array_equal(x[i], expected[key][name])
        single = cache.read([key])
        np.testing.assert_array_equal(batch.cls_attn[i], single.cls_attn[0])
    assert cache.read([]).features["eva"].shape == (0, 64, 32)


def test_read_without_decode_gives_the_stored_components(built_cache, expected):
    from cache import get_codec

    path, manifest = built_cache
    cache, keys = open_cache(path), ["img-002-00", "img-000-01", "img-002-00"]
    raw, batch = cache.read(keys, decode=False), cache.read(keys)
    np.testing.assert_array_equal(raw.cls_state, batch.cls_state)
    for t in manifest.teachers:
        codec = get_codec(t.codec)
        comps = codec.components(t.tokens, t.channels)
        assert sorted(raw.features[t.name]) == sorted(c.name for c in comps)
        for c in comps:
            part = raw.features[t.name][c.name]
            assert part.dtype == np.dtype(c.dtype) and part.shape == (3, *c.shape)
        decoded = codec.decode(raw.features[t.name])
        np.testing.assert_array_equal(decoded, batch.features[t.name])
        np.testing.assert_array_equal(decoded[0], expected["img-002-00"][t.name])
    assert cache.read([], decode=False).features["eva"]["values"].shape[0] == 0


def test_teacher_subset_aux_off_and_float16(built_cache, expected):
    cache = open_cache(built_cache[0])
    batch = cache.read(["img-000-01", "img-002-00"], teachers=["eva"], dtype=np.float16, aux=False)
    assert list(batch.features) == ["eva"] and batch.cls_state is None and batch.cls_attn is None
    assert batch.features["eva"].dtype == np.float16
    np.testing.assert_array_equal(batch.features["eva"][1], expected["img-002-00"]["eva"].astype(np.float16))
    half = cache.read(["img-000-01"], dtype="float16")
    assert half.cls_attn.dtype == np.float16 and half.features["clip"].dtype == np.float16
    with pytest.raises(KeyError, match="teacher 'sam' is not in this cache"):
        cache.read(["img-000-01"], teachers=["sam"])


def test_failed_rows_are_refused_unless_allow_invalid(built_cache):
    cache = open_cache(built_cache[0])
    bad = "img-001-01"
    assert cache.failed() == {bad: "image decode error: truncated JPEG"} and not cache.is_valid(bad)
    with pytest.raises(CacheError, match=f"'{bad}'.*failed extraction.*truncated JPEG.*allow_invalid"):
        cache.read(["img-001-00", bad])
    batch = cache.read(["img-001-00", bad], allow_invalid=True)
    assert list(batch.valid) == [True, False]
    assert not batch.features["clip"][1].any() and not batch.cls_attn[1].any()  # stored as zeros


def test_uncommitted_and_unknown_keys_are_refused(tmp_path, manifest):
    path = tmp_path / "c"
    synth.build_cache(path, manifest, shards=[0], null=False)
    cache = open_cache(path)
    assert not cache.complete and cache.committed_shards == [0]
    for key in ("img-001-00", NULL_KEY, "never-written"):
        with pytest.raises(CacheError, match=f"image key '{key}' is not in any committed shard"):
            cache.read([key])
    synth.write_shard(CacheWriter.open(path, manifest), 1)
    assert "img-001-00" not in cache
    cache.reload()  # picks up shards committed since opening
    assert cache.read(["img-001-00"]).valid.all()


def test_no_image_row_via_null_key(built_cache, expected):
    path, manifest = built_cache
    cache = open_cache(path)
    assert cache.row(NULL_KEY) == manifest.null_row
    batch = cache.read([NULL_KEY])
    np.testing.assert_array_equal(batch.features["eva"][0], expected[NULL_KEY]["eva"])


def test_memory_store_round_trip(memory_url, manifest):
    synth.build_cache(memory_url, manifest)
    cache = open_cache(memory_url)
    assert cache.complete and len(cache) == 12
    ref = synth.expected_decoded(manifest)
    np.testing.assert_array_equal(cache.read(["img-002-01"]).features["convnext"][0], ref["img-002-01"]["convnext"])


def test_rewriting_a_shard_is_idempotent(tmp_path, manifest):
    path = tmp_path / "c"
    synth.build_cache(path, manifest)
    before = open_cache(path)
    first = before.read(before.keys(), allow_invalid=True)
    with pytest.raises(CacheError, match="shard 00001 is already committed .* --repair"):
        synth.write_shard(CacheWriter.open(path, manifest), 1)  # never uncommits a valid shard by accident
    commit = synth.write_shard(CacheWriter.open(path, manifest), 1, replace=True)

    def content(c):  # a rewrite's marker equals the old one but for when/where it was written
        return dataclasses.replace(c, written_at="", writer="")

    assert content(commit) == content(before.commits[1])
    again = open_cache(path).read(before.keys(), allow_invalid=True)
    for name in first.features:
        np.testing.assert_array_equal(again.features[name], first.features[name])
    np.testing.assert_array_equal(again.cls_attn, first.cls_attn)


def test_write_validation_errors(tmp_path, manifest):
    w = CacheWriter.create(tmp_path / "c", manifest)
    d = synth.shard_data(manifest, 0)
    args = (d["features"], d["cls_state"], d["cls_attn"])
    with pytest.raises(ValueError, match="duplicate keys"):
        w.write_shard(0, ["a", "a", "b", "c"], *args)
    with pytest.raises(ValueError, match="reserved for the no-image row"):
        w.write_shard(0, [NULL_KEY, "a", "b", "c"], *args)
    with pytest.raises(ValueError, match="5 keys but the shard holds 4 rows"):
        w.write_shard(0, list("abcde"), *args)
    with pytest.raises(ValueError, match=r"teacher eva: features shape \(4, 64, 31\)"):
        w.write_shard(0, d["keys"], d["features"] | {"eva": np.zeros((4, 64, 31))}, d["cls_state"], d["cls_attn"])
    with pytest.raises(ValueError, match=r"missing \['convnext'\]"):
        w.write_shard(
            0, d["keys"], {k: v for k, v in d["features"].items() if k != "convnext"}, d["cls_state"], d["cls_attn"]
        )
    with pytest.raises(ValueError, match="cls_attn: expected shape"):
        w.write_shard(0, d["keys"], d["features"], d["cls_state"], None)
    assert w.committed_shards() == set()


def test_nonfinite_features_raise_naming_images_or_mark_them_failed(tmp_path, manifest):
    w = CacheWriter.create(tmp_path / "c", manifest)
    d = synth.shard_data(manifest, 0)
    d["features"]["eva"][2, 5, 0] = np.nan
    with pytest.raises(ValueError, match=r"teacher eva produced NaN/Inf for image\(s\) \['img-000-02'\]"):
        w.write_shard(0, d["keys"], d["features"], d["cls_state"], d["cls_attn"])
    assert not w.is_committed(0)
    commit = w.write_shard(0, d["keys"], d["features"], d["cls_state"], d["cls_attn"], nonfinite="mark_failed")
    assert commit.failed == {"img-000-02": "teacher eva produced NaN/Inf"}
    assert not open_cache(tmp_path / "c").is_valid("img-000-02")


# -- worker processes ------------------------------------------------------------------------


def _read_in_worker(args):
    cache, keys = args
    batch = cache.read(keys)
    return {name: x.tobytes() for name, x in batch.features.items()} | {"attn": batch.cls_attn.tobytes()}


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pickled_reader_works_in_worker_processes(built_cache, method):
    cache = open_cache(built_cache[0])
    keys = ["img-002-01", "img-000-03", NULL_KEY]
    here = _read_in_worker((cache, keys))  # opens zarr handles in this process first
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._group is None and clone.keys() == cache.keys()
    with mp.get_context(method).Pool(2) as pool:
        results = pool.map(_read_in_worker, [(cache, keys), (clone, keys)])
    assert results == [here, here]


# -- opening things that are not (this version of) a cache ------------------------------------


def test_edited_format_version_gives_a_clear_error(tmp_path, manifest):
    path = tmp_path / "c"
    synth.build_cache(path, manifest, shards=[0], null=False)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["movekd"]["format_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="cache format version 99 is not supported.*upgrade movekd") as info:
        open_cache(path)
    assert str(path) in str(info.value)
    with pytest.raises(CacheError, match="version 99"):
        CacheWriter.open(path, manifest)


def test_plain_zarr_group_and_missing_path_give_clear_errors(tmp_path):
    zarr.open_group(str(tmp_path / "plain"), mode="w", attributes={"other": 1})
    with pytest.raises(CacheError, match="is a zarr group but not a movekd cache"):
        FeatureCache(tmp_path / "plain")
    with pytest.raises(CacheError, match="no cache at .*nowhere.*no zarr.json"):
        open_cache(tmp_path / "nowhere")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "zarr.json").write_text("{not json")
    with pytest.raises(CacheError, match="cannot open the zarr group"):
        open_cache(tmp_path / "garbage")


def test_channel_stats_missing_is_a_clear_error(built_cache):
    with pytest.raises(CacheError, match="no channel statistics; run `movekd cache stats"):
        open_cache(built_cache[0]).channel_stats("eva")


def test_write_encoded_matches_write_shard(tmp_path, manifest):
    from cache import get_codec

    d = synth.shard_data(manifest, 1)
    failed = synth.default_failed(manifest, 1)
    a = CacheWriter.create(tmp_path / "a", manifest)
    via_floats = a.write_shard(1, d["keys"], d["features"], d["cls_state"], d["cls_attn"], failed=failed)
    encoded = {t.name: get_codec(t.codec).encode(d["features"][t.name]) for t in manifest.teachers}
    b = CacheWriter.create(tmp_path / "b", manifest)
    via_encoded = b.write_encoded(1, d["keys"], encoded, d["cls_state"], d["cls_attn"], failed=failed)
    assert via_encoded.checksums == via_floats.checksums and via_encoded.failed == failed
    with pytest.raises(ValueError, match="component 'scale' must be float32"):
        bad = {**encoded, "eva": {**encoded["eva"], "scale": encoded["eva"]["scale"].astype(np.float16)}}
        b.write_encoded(1, d["keys"], bad, d["cls_state"], d["cls_attn"])
