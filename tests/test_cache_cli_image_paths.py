"""`movekd cache show/attn` name an image by its path as well as by its key.

A cache is built over a real pack (three photo crops, two pack shards) with the pack's keys and
the pack recorded in the manifest's notes as `movekd extract` records it; the command then takes
the path as the LLaVA JSON has it (relative to the pack's image root), the file itself (absolute,
or a copy elsewhere: the key is its content hash), or `--packed DIR` when the pack has moved.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cache import CacheWriter, open_cache
from jobs.cli import main
from pipeline.packed_dataset import PackedDataset
from tests.cache import synth
from tests.helpers.datasets import pack_crops


@pytest.fixture
def packed_cache(tmp_path):
    packed = pack_crops(str(tmp_path), 3, shard_size=2)
    manifest = synth.make_manifest(
        num_shards=packed.num_shards,
        shard_size=packed.shard_size,
        dataset_fingerprint=packed.fingerprint,
        notes={"extract_config": {"packed": packed.root}},
    )
    writer = CacheWriter.create(tmp_path / "cache", manifest)
    for shard in range(packed.num_shards):
        keys = packed.keys_in_shard(shard)
        data = synth.shard_data(manifest, 0)
        n = len(keys)
        writer.write_shard(
            shard, keys, {t: x[:n] for t, x in data["features"].items()}, data["cls_state"][:n], data["cls_attn"][:n]
        )
    return packed, str(tmp_path / "cache")


def _show(capsys, cache, name, *extra) -> tuple[int, dict | None, str]:
    code = main(["cache", "show", cache, name, "--json", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_show_takes_the_path_the_llava_json_has(capsys, packed_cache):
    packed, cache = packed_cache
    rel = "coco/000001.jpg"
    key = packed.key_for_path(rel)
    code, info, err = _show(capsys, cache, rel)
    assert code == 0 and info["key"] == key, err
    assert info["row"] == open_cache(cache).row(key)


def test_show_takes_the_file_under_the_image_root_or_a_copy_of_it(capsys, packed_cache, tmp_path):
    packed, cache = packed_cache
    image = os.path.join(packed.index["image_root"], "coco", "000002.jpg")
    key = packed.key_for_path("coco/000002.jpg")
    assert _show(capsys, cache, image)[1]["key"] == key
    copy = tmp_path / "elsewhere" / "photo.jpg"  # not in the pack's index: found by its content
    copy.parent.mkdir()
    shutil.copy(image, copy)
    assert _show(capsys, cache, str(copy))[1]["key"] == key


def test_a_moved_pack_is_named_with_pack(capsys, packed_cache, tmp_path):
    packed, cache = packed_cache
    moved = str(tmp_path / "moved-pack")
    shutil.move(packed.root, moved)
    code, _, err = _show(capsys, cache, "coco/000000.jpg")
    assert code == 2 and "--pack" in err and len(err.strip().splitlines()) == 1
    code, info, _ = _show(capsys, cache, "coco/000000.jpg", "--packed", moved)
    assert code == 0 and info["key"] == PackedDataset(moved).key_for_path("coco/000000.jpg")


def test_an_unknown_name_is_one_line_naming_each_attempt(capsys, packed_cache):
    _, cache = packed_cache
    code, _, err = _show(capsys, cache, "coco/999999.jpg")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "not an image key" in lines[0] and "not an image path of the pack" in lines[0]
    assert main(["cache", "show", cache, "0123456789abcdef"]) == 2  # a key-like name: the same one line
    assert "not an image key" in capsys.readouterr().err


def test_a_changed_file_is_flagged(capsys, packed_cache):
    """The path is in the pack but the file's bytes changed since packing: the packed image's
    features are shown (what training uses for that path), with a note that they differ."""
    packed, cache = packed_cache
    image = os.path.join(packed.index["image_root"], "coco", "000000.jpg")
    with open(image, "ab") as f:
        f.write(b"\0")
    code, info, err = _show(capsys, cache, "coco/000000.jpg")
    assert code == 0 and info["key"] == packed.key_for_path("coco/000000.jpg")
    assert "differ" in err and "coco/000000.jpg" in err


def test_attn_takes_an_image_path(capsys, packed_cache, tmp_path):
    packed, cache = packed_cache
    out = tmp_path / "a.png"
    image = os.path.join(packed.index["image_root"], "coco", "000001.jpg")
    assert main(["cache", "attn", cache, "coco/000001.jpg", "--out", str(out), "--image", image]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_m_cache_says_where_paths_are_resolved(capsys, packed_cache):
    from cache import cli

    _, cache = packed_cache
    assert cli.main(["show", cache, "coco/000001.jpg"]) == 2
    err = capsys.readouterr().err
    assert "not an image key" in err and "movekd cache show" in err
