"""The bundled sample builds byte-identically and packs with exactly the planted oddities."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.llava_data import IMAGE_TOKEN
from pipeline.packing import PackedDataset, pack_dataset
from pipeline.sample_data import FINETUNE_JSON, PRETRAIN_JSON, build_sample


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            path = os.path.join(d, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample(str(tmp_path_factory.mktemp("sample")))


@pytest.fixture(scope="module")
def packed(sample, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packed"))
    result = pack_dataset(sample["json"], sample["image_root"], out, shard_size=4, workers=2, progress=False)
    return result, PackedDataset(out)


def test_builds_deterministically(sample, tmp_path):
    again = build_sample(str(tmp_path / "again"))
    assert again["expected"] == sample["expected"]
    first, second = _tree(sample["root"]), _tree(again["root"])
    assert first == second
    assert 12 <= sum(n.startswith("images") for n in first) <= 16


def test_rows_look_like_llava(sample):
    pretrain = json.load(open(os.path.join(sample["root"], PRETRAIN_JSON)))
    finetune = json.load(open(os.path.join(sample["root"], FINETUNE_JSON)))
    for row in pretrain:
        assert row["image"].count("/") == 1 and row["image"].endswith(".jpg")
        human, gpt = row["conversations"]
        assert human["value"] == IMAGE_TOKEN and len(gpt["value"].split()) >= 5
    prefixes = {row["image"].split("/")[0] for row in finetune if "image" in row}
    assert {"coco", "gqa", "vg", "ocr_vqa", "textvqa"} <= prefixes
    assert any(len(row["conversations"]) >= 4 for row in finetune)
    assert sum("image" not in row for row in finetune) == 1


def test_packs_with_expected_report(sample, packed):
    result, ds = packed
    report = json.load(open(result.report_path))
    expected = sample["expected"]
    for key in ("rows", "rows_text_only", "unique_paths", "unique_images"):
        assert report["counts"][key] == expected[key], key
    for cat in ("unreadable", "duplicate_content", "format_mismatch", "color_mode"):
        assert sorted(p["path"] for p in report["problems"][cat]) == sorted(expected[cat]), cat
    assert set(report["problems"]) == {
        "unreadable",
        "duplicate_content",
        "format_mismatch",
        "color_mode",
    }  # nothing else is wrong with the sample
    assert ds.num_images == expected["unique_images"] == result.num_images
    assert ds.num_shards == -(-ds.num_images // 4)


def test_sample_lookups(packed):
    _, ds = packed
    moto = ds.key_for_path("coco/train2017/000000000139.jpg")
    assert ds.key_for_path("vg/VG_100K/2316472.jpg") == moto
    assert ds.rows_for_key(moto, FINETUNE_JSON) == {FINETUNE_JSON: [0, 1, 2, 3]}
    assert ds.text_only_rows(FINETUNE_JSON) == [11]
    assert ds.key_for_row(FINETUNE_JSON, 10) is None  # the truncated image's row is skipped
    assert ds.key_for_path("textvqa/train_images/0a0bc91825468c45.jpg") is None
