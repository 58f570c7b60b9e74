"""jobs.image_source: random access into packed tars returns the original bytes (also after a
fork and with few handles), records join rows to keys, and the glue feeds a DistillDataset."""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import multiprocessing
import pickle

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from cache import CacheManifest, CacheWriter, PreprocessSpec, open_cache
from jobs.image_source import (
    FolderImageSource,
    PackedImageSource,
    check_pack_matches_cache,
    records_from_packed,
)
from pipeline.packing import PackedDataset, pack_dataset
from student.data import DistillDataset
from student.tiny import make_tiny_tokenizer
from tests.cache import synth

PHOTOS = {
    "a/astronaut.jpg": ("astronaut.png", "JPEG"),
    "a/chelsea.png": ("chelsea.png", "PNG"),
    "b/coffee.jpg": ("coffee.png", "JPEG"),
    "b/camera.jpg": ("camera.png", "JPEG"),
    "b/rocket.jpg": ("rocket.jpg", "JPEG"),
}


def _encode(name: str, fmt: str) -> bytes:
    with Image.open(importlib.resources.files("skimage.data") / name) as im:
        small = im.reduce(4)
    buf = io.BytesIO()
    small.save(buf, format=fmt)
    return buf.getvalue()


def _row(rid, image=None, q="Describe the image.", a="A photo."):
    row = {
        "id": rid,
        "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}],
    }
    if image is not None:
        row["image"] = image
    return row


ROWS = [
    _row("r0", "a/astronaut.jpg"),
    _row("r1", "a/chelsea.png", a="A cat."),
    _row("t0", q="Hi?", a="Hello."),
    _row("r2", "a/astronaut.jpg", q="Who is it?", a="An astronaut."),
    _row("r3", "b/astro_copy.jpg"),
    _row("r4", "b/missing.jpg"),
    _row("r5", "b/coffee.jpg"),
    _row("r6", "b/camera.jpg"),
    _row("r7", "./b/rocket.jpg"),
]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("pack")
    root = base / "images"
    files = {rel: _encode(*src) for rel, src in PHOTOS.items()}
    files["b/astro_copy.jpg"] = files["a/astronaut.jpg"]
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (base / "train.json").write_text(json.dumps(ROWS))
    pack_dataset([str(base / "train.json")], str(root), str(base / "out"), shard_size=2, workers=1, progress=False)
    return {"out": str(base / "out"), "json": str(base / "train.json"), "root": str(root), "files": files}


def test_read_back_by_key_equals_original_bytes(packed):
    src, pd = PackedImageSource(packed["out"]), PackedDataset(packed["out"])
    assert pd.num_shards == 3  # the images span several shards
    for rel, data in packed["files"].items():
        key = pd.key_for_path(rel)
        assert src.read_bytes(key) == data
        with Image.open(io.BytesIO(data)) as want:
            assert np.array_equal(np.asarray(src(key)), np.asarray(want))


def test_few_handles_and_after_fork_and_pickle(packed):
    src = PackedImageSource(packed["out"], max_open=1)
    keys = list(PackedDataset(packed["out"]).keys.astype(str))
    digests = {k: hashlib.sha256(src.read_bytes(k)).hexdigest() for k in keys + keys[::-1]}
    assert len(src._fds) == 1
    clone = pickle.loads(pickle.dumps(src))
    assert {k: hashlib.sha256(clone.read_bytes(k)).hexdigest() for k in keys} == digests
    global _FORKED
    _FORKED = src  # inherited by fork with its open handles, not pickled
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_digest_in_child, keys)
    assert dict(zip(keys, got)) == digests
    src.close()


_FORKED: PackedImageSource | None = None


def _digest_in_child(key):
    return hashlib.sha256(_FORKED.read_bytes(key)).hexdigest()


def test_folder_image_source(packed):
    src = FolderImageSource(packed["root"], {"k": "a/chelsea.png", "out": "../train.json"})
    with Image.open(io.BytesIO(packed["files"]["a/chelsea.png"])) as want:
        assert np.array_equal(np.asarray(src("k")), np.asarray(want))
    with pytest.raises(ValueError, match="outside the image root"):
        src("out")
    with pytest.raises(ValueError, match="has no path"):
        src("nope")


def test_records_from_packed_joins_rows(packed):
    pd = PackedDataset(packed["out"])
    recs = records_from_packed(packed["out"], packed["json"])
    assert [r.row_id for r in recs] == ["r0", "r1", "t0", "r2", "r3", "r5", "r6", "r7"]
    by_id = {r.row_id: r for r in recs}
    astronaut = pd.key_for_path("a/astronaut.jpg")
    assert by_id["r0"].image_key == by_id["r2"].image_key == by_id["r3"].image_key == astronaut  # same path, same bytes
    assert by_id["t0"].image_key is None
    assert by_id["r7"].image_key == pd.key_for_path("b/rocket.jpg")
    assert by_id["r2"].row_index == 3 and by_id["r2"].source == "train.json"
    assert list(by_id["r2"].conversations) == ROWS[3]["conversations"]
    assert recs.skipped["rejected_by_pack"]["count"] == 1
    assert "row 5 (id r4)" in recs.skipped["rejected_by_pack"]["examples"][0]


def test_records_refuse_an_edited_json(packed, tmp_path):
    edited = tmp_path / "train.json"
    edited.write_text(json.dumps(ROWS[:-1] + [_row("r7", "./b/rocket.jpg", a="Changed.")]))
    with pytest.raises(ValueError, match="not the file that was packed"):
        records_from_packed(packed["out"], str(edited))
    with pytest.raises(ValueError, match="no JSON file named 'other.json'"):
        records_from_packed(packed["out"], str(tmp_path / "other.json"))


def _cache_for_pack(path: str, pd: PackedDataset) -> None:
    clip = synth.make_teacher("clip", (4, 4), 8, "bf16", 56, has_cls=True)
    m = CacheManifest(
        teachers=[clip],
        num_shards=1,
        shard_size=8,
        dataset_fingerprint=pd.fingerprint,
        dataset_name=pd.name,
        cls_teacher="clip",
    )
    writer = CacheWriter.create(path, m)
    rng = np.random.default_rng(0)
    for shard, keys in ((0, list(pd.keys.astype(str))), (1, None)):
        n = len(keys) if keys else 1
        args = (
            {"clip": rng.standard_normal((n, 16, 8)).astype(np.float32)},
            rng.standard_normal((n, 8)).astype(np.float32),
            np.full((n, 16), 1 / 16, np.float32),
        )
        writer.write_shard(shard, keys, *args) if keys else writer.write_null(*args)


def test_glue_feeds_a_distill_dataset(packed, tmp_path):
    pd = PackedDataset(packed["out"])
    _cache_for_pack(str(tmp_path / "cache"), pd)
    cache = open_cache(str(tmp_path / "cache"))
    check_pack_matches_cache(packed["out"], cache)
    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    recs = records_from_packed(packed["out"], packed["json"])
    ds = DistillDataset(
        recs, PackedImageSource(packed["out"]), cache, tok, preprocess=PreprocessSpec(56), max_length=256
    )
    assert len(ds) == len(recs) and ds.modalities().count(False) == 1
    s = ds[0]
    assert s["pixel_values"].shape == (3, 56, 56) and s["targets"]["clip"].shape == (16, 8)
    with pytest.raises(ValueError, match="not from the pack"):
        check_pack_matches_cache(packed["out"], open_cache(_synthetic(tmp_path)))


def _synthetic(tmp_path) -> str:
    path = str(tmp_path / "other")
    synth.build_cache(path)
    return path
