"""``cache.multi``: several caches of one pack read as one, joined by image key."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cache import NULL_KEY, CacheError, CacheManifest, FeatureCache, open_cache
from cache.multi import CacheUnion, open_caches
from tests.cache.synth import build_cache, make_manifest, make_teacher


def sam_manifest(**overrides) -> CacheManifest:
    kw = dict(
        teachers=[make_teacher("sam", (2, 2), 16, "fp16")],
        num_shards=3,
        shard_size=4,
        dataset_fingerprint="sha256:toy-dataset",
        dataset_name="toy",
        cls_teacher=None,
    )
    kw.update(overrides)
    return CacheManifest(**kw)


@pytest.fixture
def pair(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_cache(a)  # clip (CLS), eva, convnext; img-001-01 failed
    build_cache(b, sam_manifest(), seed=1, with_failed=False)
    return a, b


def test_union_reads_each_teacher_from_its_cache(pair):
    a, b = pair
    union = open_caches([a, b])
    assert isinstance(union, CacheUnion)
    assert union.manifest.teacher_names == ("clip", "eva", "convnext", "sam")
    assert union.manifest.cls_teacher == "clip" and union.manifest.dataset_fingerprint == "sha256:toy-dataset"
    keys = ["img-002-00", "img-000-03", NULL_KEY]
    got = union.read(keys, ["sam", "clip"])
    ra, rb = open_cache(a).read(keys, ["clip"]), open_cache(b).read(keys, ["sam"])
    assert list(got.features) == ["sam", "clip"]
    np.testing.assert_array_equal(got.features["clip"], ra.features["clip"])
    np.testing.assert_array_equal(got.features["sam"], rb.features["sam"])
    np.testing.assert_array_equal(got.cls_state, ra.cls_state)
    np.testing.assert_array_equal(got.cls_attn, ra.cls_attn)
    raw = union.read(keys, ["sam"], decode=False)  # stored components, as FeatureCache gives them
    assert raw.features["sam"].keys() == open_cache(b).read(keys, ["sam"], decode=False).features["sam"].keys()


def test_failed_in_one_cache_is_failed_in_the_union_and_names_it(pair):
    a, b = pair
    union = open_caches([b, a])
    assert "img-001-01" in union and not union.is_valid("img-001-01")
    assert union.failed()["img-001-01"].startswith(f"{open_cache(a).location.url}: ")
    with pytest.raises(CacheError, match="failed extraction"):
        union.read(["img-001-01"], ["sam"])  # failed in a, which supplies no teacher read here
    assert not union.read(["img-001-01"], ["sam"], allow_invalid=True).valid[0]
    assert union.select(["sam"]) is union  # a supplies the CLS rows: it stays


def test_select_drops_caches_that_supply_nothing_read(tmp_path, pair):
    a, b = pair
    dino = str(tmp_path / "dino")
    build_cache(dino, sam_manifest(teachers=[make_teacher("dino", (2, 2), 8, "fp16")]))  # img-001-01 failed
    union = open_caches([b, dino])
    assert not union.is_valid("img-001-01")
    assert type(union.select(["sam"])) is FeatureCache  # dino dropped: its failure no longer counts
    assert union.select(["sam"]).is_valid("img-001-01")
    three = open_caches([a, b, dino]).select(["sam", "eva"])
    assert three.location.urls == (open_cache(a).location.url, open_cache(b).location.url)


def test_missing_keys_are_reported_per_cache(tmp_path, pair):
    a, _ = pair
    part = str(tmp_path / "part")
    build_cache(part, sam_manifest(), shards=[0, 2], with_failed=False)
    union = open_caches([a, part])
    assert "img-001-00" not in union and "img-000-00" in union
    report = union.missing_report(["img-001-00", "img-001-02", "img-000-00"])
    assert report == f"cache {open_cache(part).location.url} lacks 2 (e.g. ['img-001-00', 'img-001-02'])"
    assert not union.complete


def test_caches_of_different_packs_are_refused(tmp_path, pair):
    a, _ = pair
    other = str(tmp_path / "other")
    build_cache(other, sam_manifest(dataset_fingerprint="sha256:another"))
    with pytest.raises(CacheError, match="different packs") as e:
        open_caches([a, other])
    assert "sha256:toy-dataset" in str(e.value) and "sha256:another" in str(e.value) and other in str(e.value)


def test_a_teacher_in_two_caches_comes_from_the_first(tmp_path, pair, caplog):
    a, _ = pair
    c = str(tmp_path / "c")
    build_cache(c, make_manifest(teachers=[make_teacher("clip", (4, 4), 64, "bf16", 56, weights_fingerprint="x")]))
    with caplog.at_level(logging.INFO, logger="cache.multi"):
        first_a = open_caches([a, c])
    assert first_a.part_of("clip").location.url == open_cache(a).location.url
    assert "with different entries" in caplog.text
    assert open_caches([c, a]).manifest.teacher("clip").weights_fingerprint == "x"


def test_one_location_opens_as_before(pair):
    a, _ = pair
    assert type(open_caches(a)) is FeatureCache and type(open_caches([a])) is FeatureCache
    with pytest.raises(CacheError, match="listed twice"):
        open_caches([a, a])
