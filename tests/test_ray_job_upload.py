"""``ray job submit --working-dir .`` uploads only code: the checkout's ``.rayignore`` (read by
Ray's own packaging code, as the upload does) keeps run outputs, caches, packs, weights and
credentials out, and an extraction started as a Ray job refuses relative ``packed``/``out``
(they would point into the job's temporary copy of the working dir)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs.extract import RAY_JOB_ENV, relative_paths_in_a_ray_job

ROOT = Path(__file__).resolve().parent.parent

SECRET_OR_DATA = [
    "runs/movekd-v1.0-pretrain/step-0000100/model.safetensors",
    "demo-out/cache/zarr.json",
    "my-cache.zarr/zarr.json",
    "packs/lcs/_commits/shard-00000.json",
    "weights/eva02_L_coco_det_sys_o365.pth",
    "checkpoints/pytorch_model.bin",
    ".env",
    ".netrc",
    "wandb/run-1/files/config.yaml",
    ".venv/bin/python",
    "packed/shard-000000.tar",
]
CODE = ["jobs/extract.py", "jobs/configs/tiny.yaml", "cache/FORMAT.md", "pyproject.toml"]


def test_rayignore_keeps_data_and_credentials_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import _dir_travel

    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy(ROOT / ".rayignore", work / ".rayignore")
    for rel in SECRET_OR_DATA + CODE:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text("x")
    uploaded = []
    _dir_travel(work, [], lambda p: uploaded.append(p), include_gitignore=False)
    files = {str(p.relative_to(work)) for p in uploaded if p.is_file()}
    assert not files & set(SECRET_OR_DATA), sorted(files & set(SECRET_OR_DATA))
    assert set(CODE) <= files


class _Cfg:
    def __init__(self, packed, out):
        self.packed, self.out = packed, out


@pytest.mark.parametrize(
    "packed, out, bad",
    [
        ("data/packed", "/abs/cache", "packed=data/packed"),
        ("/abs/packed", "caches/v1", "out=caches/v1"),
        ("/abs/packed", "s3://bucket/cache", None),
        ("/abs/packed", "/abs/cache", None),
    ],
)
def test_relative_paths_are_refused_only_inside_a_ray_job(packed, out, bad):
    cfg = _Cfg(packed, out)
    assert relative_paths_in_a_ray_job(cfg, env={}) is None  # a local run: relative to the cwd is fine
    problem = relative_paths_in_a_ray_job(cfg, env={RAY_JOB_ENV: "{}"})
    if bad is None:
        assert problem is None
    else:
        assert problem.startswith(bad) and "absolute paths" in problem


def test_the_cli_refuses_them_with_one_line(monkeypatch, capsys):
    from jobs.extract import main

    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    code = main(["--config", "tiny", "--packed", "rel/packed", "--out", "/tmp/abs-cache", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()  # (the tiny preset's model writing bars first)
    assert code == 2 and err[-1].startswith("movekd extract: packed=rel/packed: in a `ray job submit` job")
