"""Two CPU ranks (gloo) == one process with the same global batch: same per-step losses and the
same weights after a few steps, for DDP, and for FSDP2 including a sharded checkpoint resume.

Equality holds to float tolerance (reduction order differs) because every rank's micro-batch has
the same number of supervised tokens and the KD teacher weighting is batch-independent with one
non-CLIP teacher; MoLE dropout is 0 so no RNG stream is involved.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from student.checkpoint import gather_weights
from student.model import build_student
from student.mole import MoLEConfig
from student.tiny import make_tiny_llava_parts
from student.trainer import Trainer
from tests.student._trainer_fixtures import (
    RandomDistillDataset,
    collate_fn,
    ddp_worker,
    make_sampler,
    tiny_config,
    tiny_manifest,
)

pytestmark = pytest.mark.slow  # two gloo ranks in spawned processes per test

TEACHERS, N, PER_RANK = ("clip", "eva"), 24, 2
SAMPLER = "none"  # student.sampler, plain permutation: rank r takes the r-th batch of each global batch


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_llava_parts(tmp_path_factory.mktemp("tiny"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _single(cfg):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = tiny_manifest(TEACHERS)
        model = build_student(cfg, manifest)
        dataset = RandomDistillDataset(N, manifest)
        Trainer(cfg, model, dataset, collate_fn, make_sampler(SAMPLER, dataset, cfg.batch_size)).train()
    finally:
        torch.set_num_threads(before)
    return _log(Path(cfg.output_dir)), gather_weights(model)


def _spawn(cfg, dump, **extra):
    """Two gloo ranks; the worker plays the jobs layer (MASTER_ADDR=127.0.0.1, a free port)."""
    spec = {
        "config": cfg.to_dict(),
        "teachers": list(TEACHERS),
        "n": N,
        "data_seed": 0,
        "dump": str(dump),
        "sampler": SAMPLER,
        **extra,
    }
    mp.spawn(ddp_worker, args=(2, _free_port(), spec), nprocs=2, join=True)
    return _log(Path(cfg.output_dir)), load_file(str(dump))


def _assert_same(single, multi):
    (log1, w1), (log2, w2) = single, multi
    assert [r["step"] for r in log1] == [r["step"] for r in log2] and len(log1) >= 3
    for a, b in zip(log1, log2):
        assert a["samples"] == b["samples"] == 2 * PER_RANK * 2  # 2 ranks x accumulation 2
        for key in ("loss", "loss/text", "loss/kd", "loss/balance", "kd/eva", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), (a["step"], key)
    assert sorted(w1) == sorted(w2)
    bad = []
    for name in w1:
        if name.endswith("k_proj.bias"):
            # softmax is shift-invariant, so the key bias has a mathematically zero gradient; its
            # float-noise gradient differs with the reduction order and Adam normalises that noise
            # to lr-sized steps. Checked loosely: it may only drift by about lr * steps.
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-2, msg=name)
            continue
        if not torch.allclose(w2[name], w1[name], rtol=1e-4, atol=2e-6):
            bad.append((name, float((w2[name] - w1[name]).abs().max())))
    assert not bad, bad


def _cfgs(parts, tmp_path, strategy):
    common = {
        "mole": MoLEConfig(rank=4, dropout=0.0),
        "grad_accum": 2,
        "max_steps": 3,
        "stage": "finetune",
        "lr": 1e-3,
        "distributed": strategy,
        "gradient_checkpointing": True,
    }
    two = tiny_config(parts, tmp_path / strategy, batch_size=PER_RANK, **common)
    return tiny_config(parts, tmp_path / "one", batch_size=2 * PER_RANK, **common), two


@pytest.fixture(scope="module")
def single(parts, tmp_path_factory):
    """The reference: one process, global batch 2 x PER_RANK, stage 2 (LLM and CLIP base train too)."""
    one, _ = _cfgs(parts, tmp_path_factory.mktemp("single"), "ddp")
    return _single(one)


def test_ddp_two_ranks_match_one_process(parts, tmp_path, single):
    _, two = _cfgs(parts, tmp_path, "ddp")
    _assert_same(single, _spawn(two, tmp_path / "ddp.safetensors"))


def test_fsdp_two_ranks_match_one_process_across_a_resume(parts, tmp_path, single):
    """FSDP2 on CPU: sharded steps; a full-state checkpoint written at step 2 by the sharded model,
    then everything rebuilt and re-sharded, the checkpoint loaded and the run finished."""
    _, two = _cfgs(parts, tmp_path, "fsdp")
    multi = _spawn(two, tmp_path / "fsdp.safetensors", phases=[[2, False], [None, True]])
    assert [p.name for p in sorted(Path(two.output_dir).glob("step-*"))] == ["step-0000002", "step-0000003"]
    _assert_same(single, multi)
