"""Trainer: config round trip, trainable sets per stage, liveness vs autograd, loss goes down on a
fixed batch, JSONL log holds every loss part, loss-curve PNG, accumulation == bigger batch."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from jobs.config import load_config
from student.config import TrainConfig
from student.kd_loss import KDConfig
from student.model import build_student
from student.mole import MoLEConfig
from student.tiny import make_tiny_llava_parts
from student.trainable import names_by_category, set_trainable
from student.trainer import Trainer
from tests.student._trainer_fixtures import (
    RandomDistillDataset,
    collate_fn,
    make_sampler,
    tiny_config,
    tiny_manifest,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_llava_parts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_config_round_trip_presets_and_errors():
    cfg = load_config("train_v1_0_finetune", {"teachers": ["clip", "eva"], "mole": {"rank": 8}})
    assert (cfg.lr, cfg.batch_size, cfg.template, cfg.group_by_modality_length) == (2e-5, 8, "vicuna_v1", True)
    assert cfg.tune_vision_base and cfg.image_aspect_ratio == "pad" and cfg.mole.rank == 8
    pre = TrainConfig()  # the stage-1 recipe is the dataclass defaults
    assert (pre.lr, pre.batch_size, pre.template, pre.weight_decay, pre.warmup_ratio) == (1e-3, 16, "plain", 0.0, 0.03)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.teachers == ("clip", "eva")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lrr'\]"):
        TrainConfig.from_dict({"lrr": 1})
    with pytest.raises(ValueError, match=r"MoLEConfig: unknown field\(s\) \['rnk'\]"):
        TrainConfig.from_dict({"mole": {"rnk": 2}})
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainConfig(stage="sft")
    with pytest.raises(ValueError, match="tune_vision_base=True is a stage-2"):
        TrainConfig(stage="pretrain", tune_vision_base=True)


def _matching(names, patterns):
    return {n for n in names if any(re.fullmatch(p, n) for p in patterns)}


STAGE1 = [
    r"llava\.vision_tower\.encoder\.layers\.0\.mlp\.(router|lora_fc1|lora_fc2)\..*",
    r"llava\.vision_tower\.encoder\.layers\.1\.mlp\.router\..*",  # live through the balance loss
    r"llava\.projector\..*",
    r"adapters\..*",
]
DEAD = [
    r"llava\.vision_tower\.encoder\.layers\.1\.mlp\.(fc1|fc2|lora_fc1|lora_fc2)\..*",
    r"llava\.vision_tower\.post_layernorm\..*",
]


@pytest.mark.parametrize("stage,tune_base", [("pretrain", False), ("finetune", True), ("finetune", False)])
def test_trainable_sets_per_stage(parts, tmp_path, stage, tune_base):
    cfg = tiny_config(parts, tmp_path, stage=stage, tune_vision_base=tune_base)
    model = build_student(cfg, tiny_manifest())
    names = {n for n, _ in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = _matching(names, STAGE1)
    if stage == "finetune":
        expected |= _matching(names, [r"llava\.llm\..*"])
    if tune_base:
        expected |= _matching(names, [r"llava\.vision_tower\..*"]) - _matching(names, DEAD)
    assert trainable == expected
    cats = names_by_category(model)
    assert cats["dead"] == _matching(names, DEAD) and cats["llm"] == _matching(names, [r"llava\.llm\..*"])
    assert cats["adapters"] == _matching(names, [r"adapters\.(eva|convnext)\..*"]) and cats["adapters"]
    assert cats["mole"] == _matching(names, STAGE1[:2])
    assert set().union(*cats.values()) == names and sum(map(len, cats.values())) == len(names)


def test_dead_parameters_are_exactly_those_autograd_never_reaches(parts, tmp_path):
    model = build_student(tiny_config(parts, tmp_path), tiny_manifest())
    model.requires_grad_(True)
    batch = collate_fn([RandomDistillDataset(8, tiny_manifest())[i] for i in range(4)])
    model(batch)["loss"].backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == names_by_category(model, ["dead"])["dead"]
    set_trainable(model, "finetune", tune_vision_base=True)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in no_grad)


def _run(parts, out, manifest, n, distinct=None, shuffle=True, **overrides):
    cfg = tiny_config(parts, out, **overrides)
    model = build_student(cfg, manifest)
    dataset = RandomDistillDataset(n, manifest, distinct=distinct)
    trainer = Trainer(
        cfg,
        model,
        dataset,
        collate_fn,
        make_sampler("none" if shuffle else "fixed", dataset, cfg.batch_size),
    )
    trainer.train()
    return trainer, [json.loads(line) for line in trainer.log_path.read_text().splitlines()]


def test_loss_decreases_on_a_fixed_batch_and_logs_every_part(parts, tmp_path):
    manifest = tiny_manifest()
    trainer, log = _run(
        parts,
        tmp_path / "run",
        manifest,
        n=40,
        distinct=4,
        shuffle=False,
        lr=1e-2,
        warmup_ratio=0.0,
        gradient_checkpointing=True,
    )
    assert trainer.model.llava.gradient_checkpointing
    assert [r["step"] for r in log] == list(range(1, 11))
    losses = [r["loss"] for r in log]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # same batch every step: monotone
    assert log[-1]["loss/kd"] < 0.95 * log[0]["loss/kd"] and log[-1]["loss/text"] < 0.98 * log[0]["loss/text"]
    required = {
        "loss",
        "loss/text",
        "loss/balance",
        "loss/kd",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "images_per_s",
        "step",
        "epoch",
        "samples",
        "images",
        "tokens",
    }
    for t in ("clip", "eva", "convnext"):
        required |= {f"kd/{t}", f"weight/{t}", f"kd_unweighted/{t}"}
    required |= {f"mole/layer{i:02d}/expert{e}" for i in range(2) for e in range(3)}
    for record in log:
        assert required <= set(record), required - set(record)
        assert all(isinstance(v, (int, float)) and v == v for v in record.values())
    assert log[0]["samples"] == 4 and log[0]["images"] == 3  # rows 0..3, row 3 is text-only
    assert log[0]["tokens"] == 4 * 11 + 3 * (16 - 1)
    png = trainer.plot_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (trainer.out / "step-0000010" / "model.safetensors").is_file()


def test_accumulation_equals_one_bigger_batch(parts, tmp_path):
    """Equal token counts per micro-batch and a batch-independent teacher weighting (one
    non-CLIP teacher): accum 2 x batch 2 must follow batch 4 to float precision."""
    manifest = tiny_manifest(("clip", "eva"))
    common = dict(mole=MoLEConfig(rank=4, dropout=0.0), max_steps=3, n=24, shuffle=True)
    _, big = _run(parts, tmp_path / "big", manifest, batch_size=4, **common)
    small_trainer, small = _run(parts, tmp_path / "small", manifest, batch_size=2, grad_accum=2, **common)
    assert len(big) == len(small) == 3
    for a, b in zip(big, small):
        for key in ("loss", "loss/text", "loss/kd", "loss/balance", "kd/eva", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_refuses_to_overwrite_checkpoints_and_checks_batches(parts, tmp_path):
    manifest = tiny_manifest()
    trainer, _ = _run(parts, tmp_path / "run", manifest, n=8, max_steps=1)
    again = Trainer(
        trainer.cfg,
        build_student(trainer.cfg, manifest),
        RandomDistillDataset(8, manifest),
        collate_fn,
        make_sampler("none", RandomDistillDataset(8, manifest), 4),
    )
    with pytest.raises(ValueError, match="already holds checkpoints: pass resume=True"):
        again.train()
    batch = collate_fn([RandomDistillDataset(4, manifest)[i] for i in range(2)])
    del batch["targets"]["eva"]
    with pytest.raises(ValueError, match=r"lacks cached features of teacher\(s\) \['eva'\]"):
        again.model(batch)
    cfg = dataclasses.replace(trainer.cfg, teachers=("clip", "sam"))
    with pytest.raises(ValueError, match=r"\['sam'\] are not in the cache"):
        build_student(cfg, manifest)
    with pytest.raises(ValueError, match="no cls_teacher"):
        build_student(trainer.cfg, dataclasses.replace(manifest, cls_teacher=None))
    ok = dataclasses.replace(trainer.cfg, kd=KDConfig(token_weighting="uniform", teacher_weighting="fixed"))
    build_student(ok, dataclasses.replace(manifest, cls_teacher=None))
