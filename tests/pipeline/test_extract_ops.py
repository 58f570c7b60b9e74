"""Extraction as operators run it: two drivers on one cache, repairing a damaged cache.

Real processes and real files: two drivers are two Python processes running the in-process
runner (``extract_in_process``, the same plan, queue and claims as the Ray runner) on one small
cache, started together; repair damages a real cache (a corrupt marker, a truncated data file)
and re-extracts it. Tiny CLIP teacher only, so each test takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cache import open_cache, verify_cache
from pipeline.extract import extract_in_process
from pipeline.extract_config import ExtractConfig
from pipeline.extract_report import summarize
from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers.datasets import pack_crops

ROOT = Path(__file__).resolve().parents[2]

# One driver: builds its extractor (teachers loaded), waits for the start file, then runs the plan.
# Every shard it really computes is appended to its log, with a short sleep so the drivers overlap.
DRIVER = """
import json, os, sys, time
from movekd_compat import ensure_torchvision_importable
ensure_torchvision_importable()  # what every entry point does first
from pipeline.extract import extract_in_process
from pipeline.extract_config import ExtractConfig
from pipeline.extract_worker import ShardExtractor

cfg = ExtractConfig.from_dict(json.load(open(sys.argv[1])))
computed, start = sys.argv[2], sys.argv[3]
run_shard, null_row = ShardExtractor._run_shard, ShardExtractor._null_row
def logged(real, shard):
    with open(computed, "a") as f:
        f.write(f"{shard}\\n")
    time.sleep(0.15)
ShardExtractor._run_shard = lambda self, shard, times: (logged(None, shard), run_shard(self, shard, times))[1]
ShardExtractor._null_row = lambda self, times: (logged(None, "null"), null_row(self, times))[1]
extractor = ShardExtractor(cfg)
while not os.path.exists(start):
    time.sleep(0.005)
report = extract_in_process(cfg, extractor)
others = sorted(getattr(report, "shards_by_others", {}))
print(json.dumps({"ok": report.ok, "done": sorted(report.shards_done), "others": others}))
"""


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_tiny_teachers(tmp_path_factory.mktemp("tiny"), families=["clip"])[0]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_crops(str(tmp_path_factory.mktemp("data")), n=8, shard_size=1)


def config(tmp_path, packed, clip, **kw) -> ExtractConfig:
    return ExtractConfig(packed=packed.root, out=str(tmp_path / "cache"), teachers=(clip,), progress=False, **kw)


def _watch_markers(out: Path, stop: threading.Event, vanished: list) -> None:
    """A concurrent reader: a committed shard's marker must never disappear."""
    seen: set[str] = set()
    while not stop.is_set():
        names = set(os.listdir(out / "_commits")) if (out / "_commits").is_dir() else set()
        names = {n for n in names if n.endswith(".json")}
        vanished += sorted(seen - names)
        seen |= names
        time.sleep(0.005)


@pytest.mark.slow  # two fresh interpreters that import torch
def test_two_drivers_on_one_cache_compute_every_shard_once(tmp_path, packed, clip):
    cfg = config(tmp_path, packed, clip, batch_size=1)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    start = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(cfg_file), str(tmp_path / f"computed-{i}"), str(start)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    stop, vanished = threading.Event(), []
    watcher = threading.Thread(target=_watch_markers, args=(Path(cfg.out), stop, vanished))
    watcher.start()
    time.sleep(0.5)
    start.write_text("go")
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        stop.set()
        watcher.join()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    computed = [line for i in range(2) for line in (tmp_path / f"computed-{i}").read_text().split()]
    expected = [str(s) for s in range(packed.num_shards)] + ["null"]
    assert sorted(computed) == sorted(expected), f"shards computed more than once: {sorted(computed)}"
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r["ok"] for r in reports)
    done = [s for r in reports for s in r["done"]]
    assert sorted(done) == list(range(packed.num_shards + 1))  # each shard committed by exactly one driver
    assert any("is in use by driver" in err for _, err in outs)  # the second driver said who holds what
    assert not vanished, f"a reader saw committed shards vanish: {vanished}"
    writers = {m.writer for m in open_cache(cfg.out).commits.values()}
    assert len(writers) == 2  # both drivers did part of the work
    assert not os.listdir(Path(cfg.out) / "_claims")  # every claim released on commit
    assert verify_cache(cfg.out, progress=False).ok


def test_a_stale_claim_of_a_dead_driver_is_taken_over(tmp_path, packed, clip):
    """A driver killed mid-run leaves claims; a rerun on the same host takes them over at once
    (the owner's pid is gone), without waiting for the lease to end."""
    from cache.claims import Claim, claim_name
    from cache.store import Location

    cfg = config(tmp_path, packed, clip, claim_lease_s=3600)
    assert extract_in_process(cfg).ok
    (Path(cfg.out) / "_commits/shard-00000.json").unlink()  # as if its driver was killed mid-shard
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    claim = Claim(0, f"{socket.gethostname()}:{int(dead.stdout)}", "deadrun", time.time() + 3600, 3600)
    Location(cfg.out).write_atomic(claim_name(0), claim.to_bytes())
    report = extract_in_process(cfg)
    assert report.ok and sorted(report.shards_done) == [0]
    assert not os.listdir(Path(cfg.out) / "_claims")


def _damage(out: Path) -> tuple[int, int]:
    """Corrupt shard 1's marker and truncate a data file of shard 3; returns (1, 3)."""
    (out / "_commits/shard-00001.json").write_text('{"marker_version": 1, "shard": 1, "keys": [')
    cache = open_cache(out)
    key = next(k for k in cache.commits[3].files if cache.commits[3].files[k] > 0)
    path = out / key
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return 1, 3


def test_repair_re_extracts_exactly_the_damaged_shards(tmp_path, packed, clip):
    cfg = config(tmp_path, packed, clip)
    assert extract_in_process(cfg).ok
    out = Path(cfg.out)
    marker_bytes = {p.name: p.read_bytes() for p in (out / "_commits").iterdir()}
    _damage(out)
    damaged_names = {"shard-00001.json", "shard-00003.json"}

    # A rerun without --repair does not count the corrupt marker as committed and says what to do.
    again = extract_in_process(cfg)
    assert not again.ok and again.shards_done == {}
    assert list(again.shards_damaged) == [1] and "unusable commit marker" in again.shards_damaged[1]
    text = summarize(again, "movekd extract --config X.yaml --repair")
    assert "DAMAGED shard 1" in text and "movekd extract --config X.yaml --repair" in text

    problems = verify_cache(cfg.out, progress=False).problems
    assert any("shard-00001.json" in p for p in problems) and any("shard 00003" in p for p in problems)
    repaired = extract_in_process(cfg, repair=True)
    assert repaired.ok, summarize(repaired)
    assert sorted(repaired.shards_done) == [1, 3] and repaired.shards_repaired == [1, 3]
    for p in (out / "_commits").iterdir():  # every other marker byte-identical: not rewritten
        if p.name not in damaged_names and p.name.endswith(".json"):
            assert p.read_bytes() == marker_bytes[p.name], p.name
    assert verify_cache(cfg.out, progress=False).ok
    cache = open_cache(cfg.out)
    assert len(cache.read(packed.keys_in_shard(1) + packed.keys_in_shard(3)).keys) == 2


def test_damage_errors_name_the_repair_command(tmp_path, packed, clip):
    cfg = config(tmp_path, packed, clip)
    assert extract_in_process(cfg).ok
    _damage(Path(cfg.out))
    cache = open_cache(cfg.out)
    with pytest.raises(ValueError, match=r"shard 00003 is damaged.*movekd extract --config CONFIG --repair"):
        cache.read(packed.keys_in_shard(3))
    assert "--repair" in cache.repair_hint()
