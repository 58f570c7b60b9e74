"""A full disk, for real: `movekd extract`, `movekd pack` and a checkpoint save on a tiny tmpfs.

The tmpfs is mounted inside an unprivileged user+mount namespace (``unshare --user
--map-root-user --mount``: no root, no sudo, gone with the process), so the writers meet a real
ENOSPC (and torch its real "unexpected pos"). Where unprivileged namespaces are not allowed (some
CI containers) the tests skip. Each test runs one script inside the namespace that does the run
and then inspects the full filesystem (it vanishes with the namespace), printing JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers.datasets import pack_crops, write_llava

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rc=$?; rmdir $d; exit $rc"
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe]
    return subprocess.run(cmd, capture_output=True).returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged user+mount namespaces for a tmpfs")


def in_full_tmpfs(mount: Path, size: str, script: str, *args: str) -> dict:
    """Run ``script`` with a ``size`` tmpfs mounted at ``mount``; returns the JSON it prints last."""
    mount.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    shell = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$1" -c "$2" "${{@:3}}"'
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", shell, str(mount), sys.executable, script]
    out = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Runs a movekd verb in a child process (real CLI boundary, stderr as a user sees it), then looks
# at what it left on the full disk. Extraction runs in-process (no Ray cluster to start).
RUN_VERB = """
import json, subprocess, sys
verb_args, cache = json.loads(sys.argv[1]), sys.argv[2]
child = '''
import sys
import pipeline.extract as pe
pe.run_extraction = lambda cfg, **kw: pe.extract_in_process(cfg, **kw)  # no Ray cluster to start
from jobs.cli import main
sys.exit(main(sys.argv[1:]))
'''
r = subprocess.run([sys.executable, "-c", child, *verb_args], capture_output=True, text=True)
out = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
if cache:
    from cache import open_cache, verify_cache
    c = open_cache(cache)
    out["committed"] = sorted(c.commits)
    out["problems"] = verify_cache(cache, progress=False).problems
print(json.dumps(out))
"""


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


@needs_tmpfs
def test_extract_on_a_full_disk_stops_with_one_line_and_keeps_the_committed_shards(tmp_path):
    packed = pack_crops(str(tmp_path / "data"), n=8, shard_size=1)
    mount = tmp_path / "small"
    cfg = {
        "base": str(ROOT / "jobs/configs/tiny.yaml"),
        "packed": packed.root,
        "out": str(mount / "cache"),
        "tiny_teachers": {"dir": str(tmp_path / "tiny"), "families": ["clip"]},
        "progress": False,
        "retry_backoff_s": 30,  # a retry would show as a 30 s wait: a full disk must not be retried
    }
    make_tiny_teachers(tmp_path / "tiny", families=["clip"])
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg))
    args = ["extract", "--config", str(tmp_path / "extract.yaml")]
    r = in_full_tmpfs(mount, "120k", RUN_VERB, json.dumps(args), str(mount / "cache"))
    assert r["rc"] == 1, r
    line = _last_line(r["stderr"])
    assert line.startswith(f"movekd extract: disk full: cannot write {mount / 'cache'}") and " free on that" in line
    assert "FAILED shard" in r["stdout"] and "STOPPED: disk full" in r["stdout"]  # the summary is printed
    assert 0 < len(r["committed"]) < packed.num_shards + 1, r  # what was committed is kept...
    assert all("not committed (extraction incomplete)" in p for p in r["problems"]), r["problems"]  # ...and valid


@needs_tmpfs
def test_pack_on_a_full_disk_is_one_line(tmp_path):
    data, image_root = write_llava(str(tmp_path), n=12)
    mount = tmp_path / "small"
    args = ["pack", "--data", data, "--image-root", image_root, "--out", str(mount / "packed"), "--no-progress"]
    r = in_full_tmpfs(mount, "48k", RUN_VERB, json.dumps(args), "")
    assert r["rc"] != 0
    line = _last_line(r["stderr"])
    assert line.startswith(f"movekd pack: disk full: cannot write {mount / 'packed'} (") and "free" in line


CHECKPOINT = """
import json, sys
import torch
from torch import nn
from cache.diskfull import DiskFullError
from student.checkpoint import TrainState, complete_checkpoints, save_checkpoint
from student.config import TrainConfig

class Student(nn.Module):  # the module tree save_checkpoint walks, at a chosen size
    def __init__(self, n):
        super().__init__()
        self.llava = nn.Module()
        self.llava.vision_tower = nn.Linear(n, n)

root = sys.argv[1]
model = Student(256)
opt = torch.optim.AdamW(model.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
out = {}
try:  # torch's own words for a full disk
    torch.save({"w": torch.zeros(1 << 21)}, root + "/raw.pt")
except RuntimeError as e:
    out["torch_error"] = str(e)
import os
os.remove(root + "/raw.pt") if os.path.exists(root + "/raw.pt") else None
parts = (model, opt, sched, {"world_size": 1}, TrainConfig())
save_checkpoint(root, TrainState(step=1), *parts)  # fits: about 0.3 MB of weights
model2 = Student(700)  # 2 MB of weights fit; with AdamW's two moments (4 MB more) torch.save does not
opt2 = torch.optim.AdamW(model2.parameters())
model2.llava.vision_tower(torch.ones(1, 700)).sum().backward()
opt2.step()
try:
    save_checkpoint(root, TrainState(step=2), model2, opt2, sched, {"world_size": 1}, TrainConfig())
except DiskFullError as e:
    out["error"] = str(e)
    out["cause"] = repr(e.__cause__)
out["complete"] = [p.name for p in complete_checkpoints(root)]
out["left"] = sorted(os.listdir(root))
print(json.dumps(out))
"""


@needs_tmpfs
def test_a_checkpoint_save_on_a_full_disk_names_the_disk_not_unexpected_pos(tmp_path):
    mount = tmp_path / "small"
    r = in_full_tmpfs(mount, "4m", CHECKPOINT, str(mount))
    assert "unexpected pos" in r["torch_error"] or "write failed" in r["torch_error"]  # what torch says itself
    assert r["error"].startswith(f"disk full: cannot write {mount / 'step-0000002.tmp'} (")
    assert "free on that filesystem" in r["error"]
    assert "unexpected pos" in r["cause"] or "write failed" in r["cause"]  # it was torch.save that failed
    assert r["complete"] == ["step-0000001"] and "step-0000002.tmp" not in r["left"]  # the old one is intact
