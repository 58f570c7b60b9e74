"""Crash safety and concurrent writers, with real processes.

A child process writes shards and, in the shard under test, stops after the first array it
writes (``CacheWriter._write_rows`` is wrapped to report and sleep); the parent then SIGKILLs it.
The protocol under test: a shard is invisible until its marker exists, the marker is removed
before a rewrite touches data, and a rerun completes the shard. Children import
``tests.cache.synth``, so the data they write is the same deterministic data the parent expects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache import CacheWriter, open_cache, verify_cache
from tests.cache import synth

ROOT = Path(__file__).resolve().parents[2]
# Every test here runs and kills child processes: slow (seconds each), run in CI, not in the fast loop.
pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"), pytest.mark.slow]

CHILD = """
import sys, time
from cache import CacheWriter
from tests.cache import synth

path, shards, stall = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3] == "stall"
writer = CacheWriter.create(path, synth.make_manifest(num_shards=int(sys.argv[4])))
for shard in shards[:-1]:
    synth.write_shard(writer, shard)
if stall:
    write_rows = CacheWriter._write_rows
    def stalled(self, *args, **kwargs):
        out = write_rows(self, *args, **kwargs)
        print("MID-SHARD", args[0], flush=True)
        time.sleep(120)
        return out
    CacheWriter._write_rows = stalled
synth.write_shard(writer, shards[-1], replace=True)  # a repair when the shard is committed
print("DONE", flush=True)
"""


def _child(path, shards: list[int], stall: bool = False, num_shards: int = 3) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [
        sys.executable,
        "-c",
        CHILD,
        str(path),
        ",".join(map(str, shards)),
        "stall" if stall else "run",
        str(num_shards),
    ]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_shard(path, shards: list[int]) -> str:
    """Run a child that writes ``shards`` and SIGKILL it inside the last one; returns the array it wrote."""
    proc = _child(path, shards, stall=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("MID-SHARD"), f"child did not reach the last shard: {line!r} {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return line.split()[1]


def _complete_and_check(path, manifest, shards: list[int]) -> None:
    writer = CacheWriter.open(path, manifest)
    for shard in shards:
        synth.write_shard(writer, shard)
    report = verify_cache(path, sample=100, progress=False)
    assert report.ok, report.problems
    _assert_contents(path, manifest)


def _assert_contents(path, manifest) -> None:
    cache = open_cache(path)
    expected = synth.expected_decoded(manifest)
    assert sorted(cache.keys()) == sorted(expected)
    batch = cache.read(cache.keys(), allow_invalid=True)
    for i, key in enumerate(batch.keys):
        if cache.is_valid(key):
            for name, x in batch.features.items():
                np.testing.assert_array_equal(x[i], expected[key][name])


def test_writer_killed_mid_shard_leaves_it_invisible_and_a_rerun_completes_it(tmp_path, manifest):
    path = tmp_path / "c"
    first_array = _kill_mid_shard(path, [0, 1])
    assert first_array == "teachers/clip/values"
    assert (path / "teachers/clip/values/c/1/0/0").exists()  # shard 1's data is partly on disk...
    cache = open_cache(path)  # ...but readers do not see it
    assert cache.committed_shards == [0] and "img-000-03" in cache
    assert not any(k.startswith("img-001") for k in cache.keys())
    report = verify_cache(path, progress=False)
    assert "shard 00001 (data shard): not committed (extraction incomplete)" in report.problems
    assert not any(p.startswith("shard 00000") for p in report.problems)
    _complete_and_check(path, manifest, [1, 2, manifest.num_shards])


def test_committed_shard_killed_during_rewrite_is_no_longer_visible(tmp_path, manifest):
    path = tmp_path / "c"
    synth.build_cache(path, manifest)
    assert verify_cache(path, progress=False).ok
    _kill_mid_shard(path, [1])
    cache = open_cache(path)
    assert cache.committed_shards == [0, 2]
    assert not any(k.startswith("img-001") for k in cache.keys()) and "img-001-01" not in cache.failed()
    report = verify_cache(path, progress=False)
    assert report.problems == ["shard 00001 (data shard): not committed (extraction incomplete)"]
    _complete_and_check(path, manifest, [1])


def test_concurrent_writers_on_different_shards_produce_a_valid_cache(tmp_path):
    manifest = synth.make_manifest(num_shards=6)
    path = tmp_path / "c"
    CacheWriter.create(path, manifest)  # the driver creates; workers only open and write shards
    procs = [_child(path, shards, num_shards=6) for shards in ([0, 3], [1, 4], [2, 5])]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "DONE" in out, err
    synth.write_shard(CacheWriter.open(path, manifest), manifest.num_shards)
    report = verify_cache(path, sample=100, progress=False)
    assert report.ok, report.problems
    _assert_contents(path, manifest)
