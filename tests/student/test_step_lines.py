"""``StepLines``: the plain progress line a log shows per logged step (no terminal, no bar)."""

from __future__ import annotations

from student.logging_utils import StepLines


def record(step: int, samples: int = 4) -> dict:
    return {"step": step, "epoch": 0, "lr": 1e-3, "loss": 2.5, "loss/text": 2.0, "loss/kd": 0.49, "samples": samples}


def test_the_line_says_step_loss_parts_lr_rate_and_eta():
    now = [100.0]
    lines = StepLines(total=10, start=0, clock=lambda: now[0])
    for step in (1, 2):  # logged every 2 steps: the rate covers both
        now[0] += 2.0
        lines.count(record(step))
    assert lines.line(record(2)) == (
        "step 2/10 (epoch 0): loss 2.5000 (text 2.0000, kd 0.4900), lr 1.00e-03, 2.00 samples/s, ETA 0:00:16"
    )


def test_after_a_resume_the_eta_counts_only_this_runs_steps():
    now = [0.0]
    lines = StepLines(total=1000, start=900, clock=lambda: now[0])
    now[0] += 10.0
    lines.count(record(901))
    assert lines.line(record(901)).endswith("0.40 samples/s, ETA 0:16:30")
