"""Checkpoints: resume equivalence in a NEW process (losses and final weights bit-identical),
keep-last-k, atomicity (.tmp leftovers, missing ``latest``), incompatible-config errors, and the
export_pretrained / load_pretrained / init_from round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student.checkpoint import CheckpointMismatchError, complete_checkpoints, find_latest
from student.export import export_pretrained, load_pretrained
from student.model import build_student
from student.mole import MoLEConfig
from student.tiny import make_tiny_llava_parts
from student.trainer import Trainer
from tests.student._trainer_fixtures import (
    RandomDistillDataset,
    collate_fn,
    full_state,
    make_sampler,
    tiny_config,
    tiny_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
N = 20  # 5 batches of 4 per epoch; grad_accum 2 -> windows 2, 2, 1 -> 3 steps/epoch, 6 in 2 epochs


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_llava_parts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(cfg, manifest=None, n=N, sampler="none"):
    manifest = manifest or tiny_manifest()
    model = build_student(cfg, manifest)
    dataset = RandomDistillDataset(n, manifest)
    return Trainer(cfg, model, dataset, collate_fn, make_sampler(sampler, dataset, cfg.batch_size))


def _log(trainer_or_dir):
    path = Path(trainer_or_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # a second training run in a child process
@pytest.mark.parametrize("sampler", ["modality_length", "none"])
def test_resume_in_a_new_process_is_exact(parts, tmp_path, sampler):
    """student.sampler's cursor protocol, with the stage-2 grouping and with a plain shuffle."""
    cfg = tiny_config(parts, tmp_path / "full", grad_accum=2, epochs=2)  # MoLE dropout 0.05: RNG matters
    full = _trainer(cfg, sampler=sampler)
    assert full.train().step == 6
    want_log, want_state = _log(tmp_path / "full"), full_state(full.model)

    cut_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "cut"))
    state = _trainer(cut_cfg, sampler=sampler).train(stop_after=4)
    assert (state.step, state.epoch, state.cursor) == (4, 1, 8)  # mid-epoch: exercises the sampler skip
    assert find_latest(tmp_path / "cut").name == "step-0000004"
    saved = json.loads((tmp_path / "cut" / "step-0000004" / "trainer_state.json").read_text())["sampler"]
    assert (saved["epoch"], saved["cursor"], saved["grouping"]) == (1, 8, sampler)
    before = _log(tmp_path / "cut")
    spec = {
        "config": cut_cfg.to_dict(),
        "teachers": ["clip", "eva", "convnext"],
        "n": N,
        "data_seed": 0,
        "resume": True,
        "dump": str(tmp_path / "resumed.safetensors"),
        "sampler": sampler,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.student._trainer_fixtures", str(tmp_path / "spec.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    got_log = _log(tmp_path / "cut")
    assert [r["step"] for r in got_log] == list(range(1, 7))
    assert got_log[:4] == before  # the child resumed at step 4 (a fresh start would rewrite these)
    skip = {"step_time_s", "tokens_per_s", "images_per_s"}
    for want, got in zip(want_log, got_log):
        assert {k: v for k, v in want.items() if k not in skip} == {k: v for k, v in got.items() if k not in skip}
    got_state = load_file(str(tmp_path / "resumed.safetensors"))
    assert sorted(got_state) == sorted(want_state)
    for name, value in want_state.items():
        assert torch.equal(value, got_state[name]), name
    init = full_state(build_student(cfg, tiny_manifest()))
    for name in (
        "llava.projector.0.weight",
        "adapters.eva.token_proj.weight",
        "llava.vision_tower.encoder.layers.0.mlp.lora_fc1.A",
    ):
        assert not torch.equal(init[name], want_state[name]), name  # trained: equality is not vacuous


def test_keep_last_k_and_latest_pointer(parts, tmp_path):
    cfg = tiny_config(parts, tmp_path, save_every=1, keep_last_k=2, max_steps=4)
    _trainer(cfg).train()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    assert (tmp_path / "latest").read_text() == "step-0000004"
    assert not list(tmp_path.glob("*.tmp"))


def test_partial_saves_are_ignored_and_cleaned(parts, tmp_path):
    cfg = tiny_config(parts, tmp_path, save_every=1, keep_last_k=5, max_steps=4)
    _trainer(cfg).train(stop_after=2)
    junk = tmp_path / "step-0000003.tmp"  # a save that died half-way
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"truncated")
    assert find_latest(tmp_path).name == "step-0000002"
    (tmp_path / "latest").unlink()  # died between the rename and the pointer update
    assert find_latest(tmp_path).name == "step-0000002"
    resumed = _trainer(cfg)
    assert resumed.train(resume=True).step == 4
    assert not junk.exists() and find_latest(tmp_path).name == "step-0000004"
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "change,fields",
    [
        (dict(mole=MoLEConfig(rank=8)), ["mole.rank", "parameters."]),
        (dict(teachers=("clip", "eva")), ["teachers", "parameters.adapters.convnext"]),
        (dict(stage="finetune"), ["stage", "parameters.llava.llm"]),
        (dict(lr=1e-4), ["optimization.lr"]),
        ("n=24", ["samples_per_epoch"]),  # a different dataset
    ],
)
def test_incompatible_checkpoint_names_the_fields(parts, tmp_path, change, fields):
    cfg = tiny_config(parts, tmp_path, max_steps=1)
    _trainer(cfg).train()
    other = cfg if isinstance(change, str) else dataclasses.replace(cfg, **change)
    with pytest.raises(CheckpointMismatchError, match="incompatible configuration") as err:
        _trainer(other, n=24 if isinstance(change, str) else N).train(resume=True)
    for f in fields:
        assert any(x.startswith(f) for x in err.value.fields), (f, err.value.fields)
        assert f.rstrip(".") in str(err.value)


def test_export_load_round_trip_and_init_from(parts, tmp_path):
    manifest = tiny_manifest()
    cfg = tiny_config(parts, tmp_path / "run", max_steps=2)
    trainer = _trainer(cfg, manifest)
    trainer.train()
    model = trainer.model.eval()
    out = export_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["llm", "movekd_student.json", "student.safetensors", "vision"]
    loaded = load_pretrained(out)
    assert full_state(loaded).keys() == full_state(model).keys()
    assert all(torch.equal(a, b) for a, b in zip(full_state(loaded).values(), full_state(model).values()))
    batch = collate_fn([RandomDistillDataset(8, manifest)[i] for i in range(4)])
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    stage2 = tiny_config(parts, tmp_path / "ft", stage="finetune", init_from=str(out))
    ft = build_student(stage2, manifest)
    assert all(torch.equal(x, y) for x, y in zip(full_state(ft).values(), full_state(model).values()))
    assert ft.llava.llm.model.layers[0].mlp.up_proj.weight.requires_grad  # stage-2 trainable set
    with pytest.raises(ValueError, match=r"mole\.rank: init_from=4 config=8"):
        build_student(dataclasses.replace(stage2, mole=MoLEConfig(rank=8)), manifest)
    with pytest.raises(ValueError, match="not a movekd student export"):
        load_pretrained(tmp_path / "run")
