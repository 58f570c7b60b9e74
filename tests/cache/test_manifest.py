"""The manifest: lossless (de)serialisation, validation at the edge with clear messages, and
mismatch errors that name exactly the differing field(s)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cache import (
    FORMAT_VERSION,
    CacheManifest,
    CacheWriter,
    ManifestError,
    ManifestMismatchError,
    PreprocessSpec,
    TeacherEntry,
)
from tests.cache.synth import make_manifest, make_teacher


def test_to_dict_from_dict_round_trip_through_json(manifest):
    d = json.loads(json.dumps(manifest.to_dict()))
    back = CacheManifest.from_dict(d)
    assert back == manifest
    assert back.to_dict() == manifest.to_dict()
    assert d["format"] == "movekd-feature-cache" and d["format_version"] == FORMAT_VERSION
    assert back.teacher("convnext").native_grid == (3, 3) and back.teacher("clip").has_cls


def test_preprocess_and_teacher_round_trip():
    spec = PreprocessSpec(
        resolution=1024,
        resize="longest_edge",
        crop="none",
        pad="bottom_right",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    t = make_teacher("sam", (64, 64), 256, "int8", preprocess=spec)
    assert TeacherEntry.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_layout_helpers(manifest):
    assert manifest.null_row == 12 and manifest.num_rows == 13
    assert manifest.shard_rows(1) == (4, 8) and manifest.shard_rows(3) == (12, 13)
    with pytest.raises(IndexError):
        manifest.shard_rows(4)
    with pytest.raises(KeyError, match="teacher 'sam' is not in this cache"):
        manifest.teacher("sam")


@pytest.mark.parametrize("version, hint", [(99, "upgrade movekd"), (0, "re-extract"), ("1", "re-extract")])
def test_unknown_format_version_says_what_to_do(manifest, version, hint):
    d = manifest.to_dict() | {"format_version": version}
    with pytest.raises(ManifestError, match=f"format version {version!r} is not supported.*{hint}"):
        CacheManifest.from_dict(d)


def test_wrong_format_name_and_non_object(manifest):
    with pytest.raises(ManifestError, match="not a movekd cache manifest"):
        CacheManifest.from_dict(manifest.to_dict() | {"format": "something-else"})
    with pytest.raises(ManifestError, match="must be a JSON object"):
        CacheManifest.from_dict(["not", "a", "dict"])


def test_missing_and_unknown_fields_are_named(manifest):
    d = manifest.to_dict()
    del d["num_shards"]
    with pytest.raises(ManifestError, match=r"manifest: missing field\(s\) \['num_shards'\]"):
        CacheManifest.from_dict(d)
    d = manifest.to_dict()
    del d["teachers"][1]["channels"]
    with pytest.raises(ManifestError, match=r"teacher 'eva': missing field\(s\) \['channels'\]"):
        CacheManifest.from_dict(d)
    d = manifest.to_dict()
    del d["teachers"][0]["preprocess"]
    with pytest.raises(ManifestError, match=r"teacher 'clip': missing field\(s\) \['preprocess'\]"):
        CacheManifest.from_dict(d)
    d = manifest.to_dict()
    d["teachers"][0]["preprocess"]["gamma"] = 2.2
    with pytest.raises(ManifestError, match=r"preprocess: unknown field\(s\) \['gamma'\]"):
        CacheManifest.from_dict(d)
    with pytest.raises(ManifestError, match="'teachers' must be a list"):
        CacheManifest.from_dict(manifest.to_dict() | {"teachers": None})


def test_invalid_values_are_rejected_at_construction():
    with pytest.raises(ManifestError, match="tokens=15 but grid"):
        dataclasses.replace(make_teacher("a"), tokens=15)
    with pytest.raises(ManifestError, match="preprocess.resize must be one of"):
        PreprocessSpec(resolution=336, resize="random")
    with pytest.raises(ManifestError, match="teacher names must be unique"):
        CacheManifest(
            teachers=[make_teacher("a"), make_teacher("a")], num_shards=1, shard_size=1, dataset_fingerprint="x"
        )
    with pytest.raises(ManifestError, match="cls_teacher 'b' is not a teacher"):
        CacheManifest(
            teachers=[make_teacher("a")], num_shards=1, shard_size=1, dataset_fingerprint="x", cls_teacher="b"
        )
    with pytest.raises(ManifestError, match="at least one teacher"):
        CacheManifest(teachers=[], num_shards=1, shard_size=1, dataset_fingerprint="x")
    with pytest.raises(ManifestError, match="must be non-empty, no '/'"):
        make_teacher("a/b")


def _with_teacher(manifest: CacheManifest, name: str, **changes) -> CacheManifest:
    teachers = [dataclasses.replace(t, **changes) if t.name == name else t for t in manifest.teachers]
    return dataclasses.replace(manifest, teachers=teachers)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: _with_teacher(m, "eva", codec="int4"), "teachers.eva.codec"),
        (
            lambda m: _with_teacher(m, "clip", preprocess=PreprocessSpec(resolution=56, aspect="pad")),
            "teachers.clip.preprocess.aspect",
        ),
        (lambda m: dataclasses.replace(m, shard_size=8), "shard_size"),
        (lambda m: dataclasses.replace(m, dataset_fingerprint="sha256:other"), "dataset_fingerprint"),
    ],
)
def test_mismatch_names_the_differing_field(manifest, change, field):
    with pytest.raises(ManifestMismatchError, match=field.replace(".", r"\.")) as info:
        manifest.check_same(change(manifest))
    assert info.value.fields == [field]
    assert "Write to a new cache path" in str(info.value)


def test_provenance_is_not_identity(manifest):
    other = dataclasses.replace(
        manifest, created="2000-01-01T00:00:00+00:00", package_version="9.9", notes={"host": "elsewhere"}
    )
    manifest.check_same(other)  # no error
    assert "created" not in manifest.identity() and "notes" not in manifest.identity()


def test_reopening_a_cache_with_a_different_manifest_is_refused(tmp_path, manifest):
    CacheWriter.create(tmp_path / "c", manifest)
    CacheWriter.create(tmp_path / "c", dataclasses.replace(manifest, created="later"))  # same identity: fine
    changed = _with_teacher(manifest, "eva", codec="int4")
    with pytest.raises(ManifestMismatchError, match=r"teachers\.eva\.codec: existing='int8' requested='int4'"):
        CacheWriter.create(tmp_path / "c", changed)
    with pytest.raises(ManifestMismatchError) as info:
        CacheWriter.open(tmp_path / "c", make_manifest(shard_size=2, num_shards=6))
    assert sorted(info.value.fields) == ["num_shards", "shard_size"]
