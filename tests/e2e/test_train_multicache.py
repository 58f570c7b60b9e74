"""Training from several caches of one pack (``cache: [A, B]``) equals training from one cache
that holds the same teachers: every logged loss term and the fixed-batch gradient, bit for bit.

The world: one pack, tiny teachers, three in-process extractions with the same settings: all four
teachers (``full``), CLIP/EVA/ConvNeXt (``base``, CLS = CLIP; the v1.0 cache) and SAM alone
(``sam``, no CLS; the SAM-only extraction of v1.1). A teacher's outputs do not depend on which
other teachers ran beside it, so the three caches hold identical bytes per teacher, and the two
runs see identical data: equality is exact on CPU (``==``, not a tolerance).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cache import NULL_KEY, open_cache
from jobs.config import expand_tiny_student
from jobs.train import Dist, build_training, resolve_config
from pipeline.extract import extract_in_process
from pipeline.extract_config import ExtractConfig
from pipeline.packing import pack_dataset
from pipeline.teachers.tiny import make_tiny_teachers
from tests.e2e.test_train import TIMING, parse
from tests.helpers.datasets import write_llava

SPLIT = {"full": ("clip", "eva", "convnext", "sam"), "base": ("clip", "eva", "convnext"), "sam": ("sam",)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multicache")
    data_json, image_root = write_llava(str(root), n=8, text_only=2)
    packed = str(root / "packed")
    pack_dataset([data_json], image_root, packed, shard_size=4, workers=1, progress=False)
    specs = {s.name: s for s in make_tiny_teachers(root / "teachers", families=list(SPLIT["full"]))}
    caches = {}
    for name, teachers in SPLIT.items():
        caches[name] = str(root / f"cache-{name}")
        cfg = ExtractConfig(
            packed=packed,
            out=caches[name],
            teachers=tuple(specs[t] for t in teachers),
            cls_teacher="clip" if "clip" in teachers else None,
            codec="fp16",
            aspect="square",
            dataset_name="e2e-multicache",
            batch_size=4,
            device="cpu",
            progress=False,
        )
        assert extract_in_process(cfg).ok
    student_dir = str(root / "student")
    expand_tiny_student({"tiny_student": {"dir": student_dir}})
    return {"root": root, "data_json": data_json, "packed": packed, "student": student_dir, "caches": caches}


def test_extractions_of_one_pack_agree_on_keys_and_rows(world):
    full, base, sam = (open_cache(world["caches"][n]) for n in ("full", "base", "sam"))
    assert full.keys() == base.keys() == sam.keys() and NULL_KEY in sam
    assert all(full.row(k) == base.row(k) == sam.row(k) for k in full.keys())
    assert full.failed() == base.failed() == sam.failed()


def train(world, out: Path, cache: str):
    sets = {
        "cache": cache,
        "image_root": world["packed"],
        "data_json": world["data_json"],
        "output_dir": str(out),
        "tiny_student.dir": world["student"],
        "progress_bar": "false",
        "plot": "false",
        "template": "vicuna_v1",  # keeps the text-only rows: the no-image row of both caches is read
    }
    argv = ["--config", "train_tiny", "--max-steps", "3", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    trainer, _ = build_training(resolve_config(parse(argv)), Dist())
    trainer.train()
    batch = trainer.collate_fn(trainer.dataset.read_batch(range(len(trainer.dataset))))
    trainer.model.zero_grad(set_to_none=True)
    out_ = trainer.module(batch)
    out_["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return trainer, log, grads


def test_two_caches_train_exactly_like_one(world, tmp_path):
    c = world["caches"]
    one, log1, g1 = train(world, tmp_path / "one", c["full"])
    two, log2, g2 = train(world, tmp_path / "two", f"[{c['base']}, {c['sam']}]")
    assert two.dataset.teachers == one.dataset.teachers == SPLIT["full"]
    assert [r["step"] for r in log1] == [1, 2, 3]
    assert sum(r["samples"] - r["images"] for r in log1) > 0, "no text-only row was trained on"
    for r1, r2 in zip(log1, log2, strict=True):
        assert {k: v for k, v in r1.items() if k not in TIMING} == {k: v for k, v in r2.items() if k not in TIMING}
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
    w1 = dict(one.model.named_parameters())
    assert all(torch.equal(p, w1[n]) for n, p in two.model.named_parameters())


def test_an_unfinished_member_cache_is_named(world, tmp_path):
    c = world["caches"]
    broken = tmp_path / "sam-broken"
    shutil.copytree(c["sam"], broken)
    marker = sorted((broken / "_commits").iterdir())[0]
    marker.unlink()  # shard 0 of the SAM cache no longer committed
    with pytest.raises(ValueError, match="uncommitted") as e:
        train(world, tmp_path / "run", f"[{c['base']}, {broken}]")
    assert str(broken) in str(e.value)


def test_train_config_cache_takes_a_path_or_a_list():
    from jobs.config import parse_override
    from student.config import TrainConfig

    key, value = parse_override("cache=[a/v1.0, b/sam]")
    cfg = TrainConfig.from_dict({key: value})
    assert cfg.cache == ("a/v1.0", "b/sam") and cfg.to_dict()["cache"] == ["a/v1.0", "b/sam"]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig(cache="one").cache == "one" and TrainConfig(cache=["one"]).cache == "one"
    for bad in ([], ["a", "a"], ["a", ""], 3):
        with pytest.raises(ValueError, match="TrainConfig.cache"):
            TrainConfig(cache=bad)
