"""Extraction through real Ray: `ray job submit`, a worker killed mid-job, the driver killed mid-job,
and a resume with a changed configuration refused. Every cluster is bound to 127.0.0.1 and is
stopped by the test that started it (embedded clusters die with their driver's process group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cache import open_cache, verify_cache
from jobs.config import load_config
from pipeline.extract import extract_in_process
from tests.helpers.datasets import pack_crops
from tests.helpers.ray_cluster import BIN, loopback_env, ray_cluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-teachers"))


def write_config(tmp: Path, packed, tiny_dir: str, **extra) -> Path:
    cfg = {
        "base": str(ROOT / "jobs/configs/tiny.yaml"),
        "packed": packed.root,
        "out": str(tmp / "cache"),
        "tiny_teachers": {"dir": tiny_dir, "families": ["clip", "eva", "convnext", "sam"]},
        "progress": False,
        **extra,
    }
    path = tmp / "extract.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def driver(config: Path, *args: str, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.extract", "--config", str(config), *args],
        cwd=ROOT,
        env=loopback_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def committed(out: Path) -> int:
    d = out / "_commits"
    return len([n for n in os.listdir(d) if n.endswith(".json")]) if d.exists() else 0


def wait_until(cond, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"condition not reached (driver rc={proc.poll()}):\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.05)


def assert_complete(out: Path, packed) -> None:
    cache = open_cache(out)
    expected = {k for s in range(packed.num_shards) for k in packed.keys_in_shard(s)}
    assert set(cache.keys()) == expected | {"__no_image__"}  # every image exactly once (no duplicates)
    assert cache.complete and not cache.failed()
    report = verify_cache(out, progress=False)
    assert report.ok, report.problems


def last_report(out: Path) -> dict:
    return json.loads(sorted((out / "_reports").iterdir())[-1].read_text())


def test_extraction_via_ray_job_submit(tmp_path, tiny_dir):
    packed = pack_crops(str(tmp_path / "data"), n=6, shard_size=4)
    config = write_config(tmp_path, packed, tiny_dir, num_workers=1)
    with ray_cluster() as (url, env):
        job = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                url,
                "--working-dir",
                str(ROOT),
                "--",
                "python",
                "-m",
                "jobs.extract",
                "--config",
                str(config),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout and "0 failed (of 3 incl. the no-image row)" in job.stdout
    assert_complete(tmp_path / "cache", packed)
    assert_same_as_in_process(tmp_path / "cache", config)


def assert_same_as_in_process(ray_cache: Path, config: Path) -> None:
    """The Ray runner and the in-process runner start from the same plan: same manifest identity,
    byte-identical data files, and commit markers equal but for when and where they were written."""
    local = ray_cache.parent / "cache-in-process"
    assert extract_in_process(load_config(config, {"out": str(local)})).ok
    a, b = open_cache(ray_cache), open_cache(local)
    assert a.manifest.identity() == b.manifest.identity()
    files = sorted(p.relative_to(ray_cache) for p in ray_cache.rglob("*") if p.is_file() and p.parts[-2] != "_reports")
    data = [f for f in files if f.parts[0] in ("teachers", "aux") and f.name != "zarr.json"]
    assert data and all((ray_cache / f).read_bytes() == (local / f).read_bytes() for f in data)
    for shard, commit in a.commits.items():
        other = b.commits[shard]
        assert (commit.keys, commit.failed, commit.checksums) == (other.keys, other.failed, other.checksums)


def test_worker_killed_mid_job_is_replaced_and_its_shard_retried(tmp_path, tiny_dir):
    packed = pack_crops(str(tmp_path / "data"), n=24, shard_size=1)
    config = write_config(tmp_path, packed, tiny_dir, num_workers=2, batch_size=1)
    proc = driver(config)
    out = tmp_path / "cache"
    wait_until(lambda: committed(out) >= 2, proc)
    victims = [p for p in psutil.process_iter(["cmdline"]) if "ShardExtractor" in " ".join(p.info["cmdline"] or [])]
    assert victims, "no extraction actor process found"
    victims[0].kill()
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    report = last_report(out)
    assert report["worker_restarts"] >= 1 and report["ok"], report
    assert_complete(out, packed)


def test_driver_killed_mid_job_then_rerun_completes_and_changed_config_is_refused(tmp_path, tiny_dir):
    packed = pack_crops(str(tmp_path / "data"), n=24, shard_size=1)
    config = write_config(tmp_path, packed, tiny_dir, num_workers=2, batch_size=1)
    out = tmp_path / "cache"
    proc = driver(config, new_session=True)
    wait_until(lambda: committed(out) >= 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray cluster, like a lost machine
    proc.communicate(timeout=60)
    done_before = committed(out)
    assert done_before < packed.num_shards + 1, "the job finished before it could be killed"

    rerun = driver(config)
    log = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, log[-4000:]
    report = last_report(out)
    assert len(report["shards_skipped"]) >= done_before - 2 and report["ok"]
    assert_complete(out, packed)

    refused = driver(config, "--set", "aspect=pad")  # the preprocessing changed
    msg = refused.communicate(timeout=600)[0]
    assert refused.returncode == 2 and "refusing to resume" in msg and "preprocess.aspect" in msg, msg[-3000:]
    fewer = write_config(tmp_path, packed, tiny_dir, num_workers=1)
    data = yaml.safe_load(fewer.read_text())
    data["tiny_teachers"]["families"] = ["clip", "eva", "convnext"]
    fewer.write_text(yaml.safe_dump(data))
    refused = driver(fewer)
    msg = refused.communicate(timeout=600)[0]
    assert refused.returncode == 2 and "teachers.sam" in msg, msg[-3000:]
