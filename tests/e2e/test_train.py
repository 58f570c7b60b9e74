"""``movekd train`` end to end: cache vs online teachers, exact resume through the CLI, clear
errors, and ``movekd demo``.

One module fixture builds the world quickly and without Ray: a 14-row LLaVA dataset (12 photo
crops, 2 text-only rows) packed into 3 shards, tiny random-weight teachers (CLIP, EVA-02,
ConvNeXt, SAM) and two ``square`` caches (fp16, int8) extracted in-process by ``ShardExtractor``,
the code every Ray actor runs; plus the tiny student. The demo test runs the real thing (Ray).

Decisions:
- Equivalence compares whole training runs built by ``build_training`` (the CLI's own builder):
  the per-step JSONL records, the trained weights, and the gradient of one fixed batch after
  training. The online run's teachers are loaded from the same tiny-teacher files through an
  extraction YAML (``base: tiny.yaml``), and their weight fingerprints are checked against the
  cache manifest, so "same teachers" is asserted, not assumed.
- Resume: an uninterrupted 4-step CLI run (a subprocess) against a run preempted after step 2
  (``tests.helpers.train_stop``, same argv; in this process, to save an interpreter start) then
  continued by ``python -m jobs.train --resume`` in a fresh process. All use one torch thread.
  ``--max-steps 2`` cannot be the interruption: ``max_steps`` sets the cosine schedule, so the
  checkpoint fingerprint refuses a resume that changes it (tested below with the other errors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from cache import open_cache, verify_cache
from jobs.config import expand_tiny_student
from jobs.train import Dist, add_arguments, build_training, resolve_config, run
from pipeline.extract import extract_in_process
from pipeline.extract_config import ExtractConfig
from pipeline.packing import pack_dataset
from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers import train_stop
from tests.helpers.datasets import write_llava
from tests.helpers.ray_cluster import loopback_env

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["clip", "eva", "convnext", "sam"]
TIMING = ("tokens_per_s", "images_per_s", "step_time_s")  # wall-clock fields of a log record


@dataclass(frozen=True)
class World:
    root: Path
    data_json: str
    packed: str
    teachers_dir: str
    student_dir: str
    caches: dict[str, str]  # codec -> cache dir


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("train")
    data_json, image_root = write_llava(str(root), n=12, text_only=2)
    packed = str(root / "packed")
    pack_dataset([data_json], image_root, packed, shard_size=4, workers=1, progress=False)
    specs = make_tiny_teachers(root / "teachers", families=FAMILIES)
    caches = {}
    for codec in ("fp16", "int8"):
        caches[codec] = str(root / f"cache-{codec}")
        assert extract_in_process(
            ExtractConfig(
                packed=packed,
                out=caches[codec],
                teachers=tuple(specs),
                codec=codec,
                aspect="square",
                dataset_name="e2e-train",
                batch_size=4,
                device="cpu",
                progress=False,
            )
        ).ok
    student_dir = str(root / "student")
    expand_tiny_student({"tiny_student": {"dir": student_dir}})  # once, before parallel runs
    return World(root, data_json, packed, str(root / "teachers"), student_dir, caches)


def train_argv(w: World, out: Path, *extra: str, codec: str = "fp16") -> list[str]:
    sets = {
        "cache": w.caches[codec],
        "image_root": w.packed,
        "data_json": w.data_json,
        "output_dir": str(out),
        "tiny_student.dir": w.student_dir,
        "progress_bar": "false",
    }
    return ["--config", "train_tiny", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# -- cached targets vs online teachers ---------------------------------------------------------
@dataclass
class Run:
    trainer: object
    log: list[dict]
    start: dict[str, torch.Tensor]  # trainable weights before training
    grads: dict[str, torch.Tensor]  # gradient of one fixed batch after training


def train_in_process(w: World, out: Path, codec: str, online: str | None = None) -> Run:
    # vicuna_v1 keeps the text-only rows (the plain template drops them), so the online teachers'
    # "no image" input is compared with the cache's reserved row too.
    args = parse(
        train_argv(w, out, "--max-steps", "4", "--set", "template=vicuna_v1", "--set", "plot=false", codec=codec)
    )
    trainer, _ = build_training(resolve_config(args), Dist(), online)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    batch = trainer.collate_fn(trainer.dataset.read_batch(range(len(trainer.dataset))))
    trainer.model.zero_grad(set_to_none=True)
    trainer.module(batch)["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return Run(trainer, read_log(out), start, grads)


@pytest.fixture(scope="module")
def online_run(world, tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("online")
    config = tmp / "extract.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "jobs/configs/tiny.yaml"),
                "tiny_teachers": {"dir": world.teachers_dir, "families": FAMILIES},
            }
        )
    )
    return train_in_process(world, tmp / "run", "fp16", online=str(config))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def rel_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None):
    """Per tensor: ||a - b|| / ||b - base|| (base None: / ||b||); the worst (value, name)."""
    return max((float((a[n] - b[n]).norm() / (b[n] - (base[n] if base else 0)).norm()), n) for n in b)


def compare(
    cached: Run,
    online: Run,
    *,
    kd_rtol: float,
    term_rtol: float,
    loss_rtol: float,
    text_rtol: float,
    norm_rtol: float,
    tensor_rtol: float,
) -> None:
    steps = [r["step"] for r in online.log]
    assert steps == [r["step"] for r in cached.log] == [1, 2, 3, 4]
    assert sum(r["samples"] - r["images"] for r in online.log) > 0, "no text-only row was trained on"
    # Text loss does not read the targets: equal bit for bit while the weights are (until the first
    # update with lr > 0; train_tiny's warmup step has lr 0), then within float noise.
    same_weights = 1 + next(i for i, r in enumerate(online.log) if r["lr"] > 0)
    for c, o in zip(cached.log, online.log):
        assert (c["samples"], c["images"], c["lr"]) == (o["samples"], o["images"], o["lr"])
        if c["step"] <= same_weights:
            assert c["loss/text"] == o["loss/text"], c["step"]
        assert rel(c["loss/text"], o["loss/text"]) <= text_rtol, c["step"]
        assert rel(c["loss/kd"], o["loss/kd"]) <= kd_rtol, c["step"]
        assert rel(c["loss"], o["loss"]) <= loss_rtol, c["step"]
        assert rel(c["grad_norm"], o["grad_norm"]) <= norm_rtol, c["step"]
        for name in FAMILIES:
            assert rel(c[f"kd/{name}"], o[f"kd/{name}"]) <= term_rtol, (c["step"], name)
    trained = {n: p.detach() for n, p in cached.trainer.model.named_parameters() if p.requires_grad}
    reference = {n: p.detach() for n, p in online.trainer.model.named_parameters() if p.requires_grad}
    assert trained.keys() == reference.keys() == online.grads.keys()
    # weights: the drift between the runs, per tensor, relative to how far training moved it
    assert rel_norm(trained, reference, online.start)[0] <= tensor_rtol
    assert rel_norm(cached.grads, online.grads)[0] <= tensor_rtol


def test_fp16_cache_trains_like_online_teachers(world, online_run, tmp_path):
    from jobs.online_teachers import OnlineTargets

    targets = online_run.trainer.collate_fn
    assert isinstance(targets, OnlineTargets) and sorted(targets.teachers) == sorted(FAMILIES)
    manifest = open_cache(world.caches["fp16"]).manifest
    for name, teacher in targets.teachers.items():  # the very weights the cache was extracted with
        assert teacher.weights_fingerprint == manifest.teacher(name).weights_fingerprint, name
    cached = train_in_process(world, tmp_path / "run", "fp16")
    # fp16 holds the fp32 teacher outputs to relMSE ~4e-8. Measured against online (4 steps):
    # KD and total loss <= 7e-6, per-teacher KD <= 3e-5, grad norm <= 2e-5; per tensor, weight drift
    # <= 3.2e-4 of the training update and fixed-batch gradient <= 2.1e-4 relative.
    compare(
        cached,
        online_run,
        kd_rtol=1e-4,
        term_rtol=1e-4,
        loss_rtol=1e-4,
        text_rtol=1e-6,
        norm_rtol=1e-4,
        tensor_rtol=2e-3,
    )


def test_int8_cache_trains_close_to_online_teachers(world, online_run, tmp_path):
    cached = train_in_process(world, tmp_path / "run", "int8")
    # int8 (per-token absmax) measured against online (4 steps): KD loss <= 6.1e-4, per-teacher
    # KD <= 1.1e-3, total <= 1.7e-4, grad norm <= 6.4e-4, text <= 8e-8; per tensor, weight drift
    # <= 1.1e-2 of the training update and fixed-batch gradient <= 6e-3 relative.
    compare(
        cached,
        online_run,
        kd_rtol=3e-3,
        term_rtol=5e-3,
        loss_rtol=1e-3,
        text_rtol=1e-6,
        norm_rtol=3e-3,
        tensor_rtol=5e-2,
    )


# -- exact resume through the CLI --------------------------------------------------------------
def launch(module: str, *argv: str) -> subprocess.Popen:
    # one thread each: two runs go in parallel on small CI machines (and every run uses the same count)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def exported(out: Path) -> dict[str, torch.Tensor]:
    files = sorted((out / "export").rglob("*.safetensors"))
    assert files, f"nothing exported under {out}"
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow
def test_cli_resume_in_a_new_process_equals_the_uninterrupted_run(world, tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    # 12 rows / batch 4 = 3 steps an epoch: the preemption is mid-epoch, the resume crosses an epoch
    uninterrupted = launch("jobs.train", *train_argv(world, full, "--max-steps", "4"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the subprocesses; the preempted run goes here, while the other runs
        assert train_stop.main(["2", *train_argv(world, parts, "--max-steps", "4")]) == 0
        torch.set_num_threads(threads)
        assert [r["step"] for r in read_log(parts)] == [1, 2] and (parts / "step-0000002").is_dir()
        resumed = finish(launch("jobs.train", *train_argv(world, parts, "--max-steps", "4", "--resume")))
        finish(uninterrupted)
    finally:
        torch.set_num_threads(threads)
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.communicate()
    assert "trained to step 4 (epoch 1)" in resumed

    def strip(log):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in log]

    a, b = strip(read_log(full)), strip(read_log(parts))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert b[2:] == a[2:] and b == a  # steps 3-4 first, for a readable failure
    wa, wb = exported(full), exported(parts)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]


# -- clear errors ------------------------------------------------------------------------------
def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = run(parse(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpointed(world, tmp_path_factory) -> Path:
    """A 2-step run's output dir (checkpoint step-0000002), to resume with a changed config."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert run(parse(train_argv(world, out, "--max-steps", "2", "--no-export", "--set", "plot=false"))) == 0
    return out


def test_teacher_missing_from_the_cache(world, tmp_path, capsys):
    code, err = cli(train_argv(world, tmp_path / "run", "--set", "teachers=[clip,nope]"), capsys)
    assert code == 2, err
    assert "['nope'] requested" in err and world.caches["fp16"] in err and "'sam'" in err


def test_square_cache_refused_for_a_pad_stage(world, tmp_path, capsys):
    code, err = cli(train_argv(world, tmp_path / "run", "--set", "image_aspect_ratio=pad"), capsys)
    assert code == 2, err
    assert "preprocess.aspect: student='pad', cache='square'" in err


def test_cache_with_an_uncommitted_shard(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(world.caches["fp16"], cache)
    markers = sorted((cache / "_commits").iterdir())
    assert len(markers) == 4  # 3 data shards + the no-image row
    markers[1].unlink()
    argv = train_argv(world, tmp_path / "run")
    argv[argv.index(f"cache={world.caches['fp16']}")] = f"cache={cache}"
    code, err = cli(argv, capsys)
    assert code == 2, err
    assert "1 of 3 shards uncommitted" in err and str(cache) in err and "movekd extract" in err


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--max-steps", "2", "--set", "mole.rank=8"], "mole.rank: checkpoint=4 now=8"),
        # extending a run changes its cosine schedule: refused unless asked for, with the way to ask
        (["--max-steps", "4"], "optimization.max_steps: checkpoint=2 now=4"),
    ],
)
def test_resume_with_an_incompatible_config(world, checkpointed, tmp_path, capsys, change, expected):
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    code, err = cli(train_argv(world, out, "--resume", "--no-export", *change), capsys)
    assert code == 2, err
    assert "incompatible configuration" in err and expected in err and "step-0000002" in err
    assert ("resume with --extend" in err) == ("max_steps" in expected)


def test_extend_a_finished_run(world, checkpointed, tmp_path, capsys):
    """A run trained to its max_steps continues to a larger one with --extend (issue 11 item 13)."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    code, err = cli(train_argv(world, out, "--extend", "--no-export", "--max-steps", "4"), capsys)
    assert code == 0, err
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    meta = json.loads((out / "step-0000004" / "trainer_state.json").read_text())
    assert meta["extensions"] == [{"step": 2, "total_steps": [2, 4], "max_steps": [2, 4]}]
    code, err = cli(train_argv(world, out, "--extend", "--no-export", "--max-steps", "3"), capsys)
    assert code == 2 and "can only make a run longer" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


def test_resume_without_a_checkpoint_is_refused_unless_auto(world, tmp_path, capsys):
    """A bare --resume on an empty output_dir was silently a new run (a wrong path went unnoticed)."""
    out = tmp_path / "typo-run"
    code, err = cli(train_argv(world, out, "--resume", "--no-export", "--max-steps", "1"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume: no checkpoint in {out} to continue" in err and "--resume auto" in err
    assert not (out / "train_log.jsonl").exists()
    code, err = cli(train_argv(world, out, "--resume", "auto", "--no-export", "--max-steps", "1"), capsys)
    assert code == 0 and [r["step"] for r in read_log(out)] == [1]


# -- the demo ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    movekd = Path(sys.executable).parent / "movekd"
    cmd = [str(movekd)] if movekd.is_file() else [sys.executable, "-m", "jobs.cli"]
    proc = subprocess.run(
        [*cmd, "demo", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env=loopback_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = verify_cache(out / "cache", progress=False)
    assert report.ok, report.problems
    pngs = list(out.glob("attn-*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as img:
        img.verify()
        assert img.format == "PNG" and min(img.size) > 0
    # The demo trains by default (--train-steps 6): its log and export must exist.
    records = read_log(out / "train")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r[k]) for r in records for k in r if k.startswith("loss"))
    assert {"loss", "loss/text", "loss/kd", "loss/balance"} <= set(records[0])
    assert (out / "train" / "export" / "student.safetensors").is_file()
