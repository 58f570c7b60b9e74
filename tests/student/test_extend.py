"""``--extend`` (issue 11 item 13): a finished run continues to a larger ``max_steps``.

Before, the only answer was a ``CheckpointMismatchError`` on ``optimization.max_steps``. Now the
change is allowed explicitly, the weights/optimizer/sampler position continue exactly, the schedule is
the new plan's from the resumed step on, the extension is recorded, and shrinking is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from student.checkpoint import CheckpointMismatchError, find_latest
from student.model import build_student
from student.optim import build_scheduler
from student.tiny import make_tiny_llava_parts
from student.trainer import Trainer
from tests.student._trainer_fixtures import RandomDistillDataset, collate_fn, make_sampler, tiny_config, tiny_manifest

N = 20  # 5 batches of 4: 5 steps per epoch


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_llava_parts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(cfg):
    manifest = tiny_manifest()
    dataset = RandomDistillDataset(N, manifest)
    sampler = make_sampler("none", dataset, cfg.batch_size)
    return Trainer(cfg, build_student(cfg, manifest), dataset, collate_fn, sampler)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _planned_lr(cfg, total: int, step: int) -> float:
    """The lr a run planned for ``total`` steps uses for its optimizer step ``step`` (1-based)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    for _ in range(step - 1):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_a_finished_run_extends_to_more_steps(parts, tmp_path, caplog):
    cfg = tiny_config(parts, tmp_path, max_steps=3, warmup_ratio=0.34, epochs=3)
    assert _trainer(cfg).train().step == 3
    longer = dataclasses.replace(cfg, max_steps=8)
    with pytest.raises(CheckpointMismatchError, match="--extend") as err:
        _trainer(longer).train(resume=True)  # the old behaviour, now with the way out named
    assert err.value.fields == ["optimization.max_steps"]

    with caplog.at_level(logging.INFO, logger="student.trainer"):
        state = _trainer(longer).train(resume=True, extend=True)
    assert state.step == 8
    assert "max_steps 3 -> 8" in caplog.text and "re-laid over 8 steps" in caplog.text
    log = _log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 9))  # steps 1-3 kept, 4-8 appended
    for step in (4, 6, 8):  # the new plan's lr from the resumed step on (warmup 3 of 8, then cosine)
        assert log[step - 1]["lr"] == pytest.approx(_planned_lr(longer, 8, step), rel=1e-6), step
    assert log[2]["lr"] == pytest.approx(_planned_lr(cfg, 3, 3), rel=1e-6)  # the first plan's, untouched
    assert _planned_lr(cfg, 3, 4) != pytest.approx(_planned_lr(longer, 8, 4))  # so the check can fail

    meta = json.loads((find_latest(tmp_path) / "trainer_state.json").read_text())
    assert meta["extensions"] == [{"step": 3, "total_steps": [3, 8], "max_steps": [3, 8]}]
    assert _trainer(longer).train(resume=True).step == 8  # the extended run resumes plainly


def test_extend_refuses_to_shrink_or_do_nothing(parts, tmp_path):
    cfg = tiny_config(parts, tmp_path, max_steps=3)
    _trainer(cfg).train()
    with pytest.raises(ValueError, match="can only make a run longer: max_steps is 3 in the checkpoint and 2"):
        _trainer(dataclasses.replace(cfg, max_steps=2)).train(resume=True, extend=True)
    with pytest.raises(ValueError, match="nothing to extend"):
        _trainer(cfg).train(resume=True, extend=True)
    with pytest.raises(CheckpointMismatchError, match="optimization.lr"):  # only the length may change
        _trainer(dataclasses.replace(cfg, max_steps=5, lr=1e-3)).train(resume=True, extend=True)
    with pytest.raises(ValueError, match="needs resume=True"):
        _trainer(dataclasses.replace(cfg, max_steps=5)).train(extend=True)


def test_extend_a_run_that_is_still_going_matches_planning_it_longer_from_the_cut(parts, tmp_path):
    """Cut at step 2 of 3, extend to 5: steps 3-5 use the 5-step plan, data order continues."""
    cfg = tiny_config(parts, tmp_path / "a", max_steps=3)
    _trainer(cfg).train(stop_after=2)
    longer = dataclasses.replace(cfg, max_steps=5)
    _trainer(longer).train(resume=True, extend=True)
    log = _log(tmp_path / "a")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert log[2]["lr"] == pytest.approx(_planned_lr(longer, 5, 3), rel=1e-6)
    ref = tiny_config(parts, tmp_path / "b", max_steps=5)  # planned at 5 from the start
    _trainer(ref).train()
    ref_log = _log(tmp_path / "b")
    assert [r["lr"] for r in log[2:]] == pytest.approx([r["lr"] for r in ref_log[2:]], rel=1e-6)
