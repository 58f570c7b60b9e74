"""``movekd train`` under a scheduler (stdout/stderr pipes, not a terminal): the log shows the run.

A real ``python -m jobs.train`` process with its stdout/stderr as pipes, on a small world built
from the shared helpers (8 photo crops and a text-only row, packed in 3 shards, a tiny CLIP
teacher cache, the tiny student): the progress bar is not drawn there, and every ``log_every``
steps one plain line says the step, the loss and its parts, the lr, samples/s and the ETA.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import expand_tiny_student
from pipeline.extract import extract_in_process
from pipeline.extract_config import ExtractConfig
from pipeline.packing import pack_dataset
from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers.datasets import write_llava

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"INFO student\.trainer: step (\d+)/4 \(epoch \d+\): loss \d+\.\d{4} \(text \d+\.\d{4}, balance \d+\.\d{4}, "
    r"kd \d+\.\d{4}\), lr \d\.\d\de[+-]\d\d, \d+\.\d\d samples/s, ETA \d+:\d\d:\d\d$"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-log")
    data_json, image_root = write_llava(str(root), n=8, text_only=1)
    packed = str(root / "packed")
    pack_dataset([data_json], image_root, packed, shard_size=4, workers=1, progress=False)
    clip = make_tiny_teachers(root / "teachers", families=["clip"])
    cache = str(root / "cache")
    cfg = ExtractConfig(packed=packed, out=cache, teachers=tuple(clip), codec="fp16", device="cpu", progress=False)
    assert extract_in_process(cfg).ok
    student = str(root / "student")
    expand_tiny_student({"tiny_student": {"dir": student}})
    return {"cache": cache, "image_root": packed, "data_json": data_json, "tiny_student.dir": student}


def test_a_run_without_a_terminal_logs_a_line_every_log_every_steps(world, tmp_path):
    sets = {**world, "output_dir": str(tmp_path / "run"), "log_every": "2", "plot": "false"}
    cmd = [sys.executable, "-m", "jobs.train", "--config", "train_tiny", "--max-steps", "4", "--no-export"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if "student.trainer: step" in ln]
    assert [int(LINE.search(ln).group(1)) for ln in lines if LINE.search(ln)] == [2, 4], out.stderr[-3000:]
    assert len(lines) == 2
    assert "train pretrain:" not in out.stderr  # no progress bar written into the pipe
