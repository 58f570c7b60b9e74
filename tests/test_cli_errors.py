"""The CLI's error boundary: a user's mistake is one line naming what is wrong and exit code 2;
a bug keeps its traceback; ``--debug`` shows the traceback of a user error too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import guarded, main

ROOT = Path(__file__).resolve().parent.parent


def test_user_errors_are_one_line_exit_2(capsys):
    def bad_input(args):
        raise ValueError("shard 3 of /x is damaged;\n  re-extract it")

    def missing(args):
        raise FileNotFoundError(2, "No such file or directory", "/data/lcs558k.json")

    assert guarded("movekd x", bad_input, None) == 2
    assert guarded("movekd x", missing, None) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "movekd x: shard 3 of /x is damaged; re-extract it  (--debug shows the traceback)"
    assert err[1].startswith("movekd x: [Errno 2] No such file or directory: '/data/lcs558k.json'")
    with pytest.raises(ValueError):
        guarded("movekd x", bad_input, None, debug=True)


def test_bugs_keep_their_traceback():
    def bug(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        guarded("movekd x", bug, None)


def test_a_train_preset_without_data_paths_names_them(capsys):
    assert main(["train", "--config", "train_v1_0_pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "leaves cache, data_json, image_root unset" in err and "--set cache=..." in err


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize(
    "argv",
    [["cache", "inspect", "{tmp}/none"], ["train", "--config", "{tmp}/missing.yaml"], ["generate", "--model", "{tmp}"]],
)
def test_real_processes_print_one_line(tmp_path, argv):
    cmd = [sys.executable, "-m", "jobs.cli", *(a.format(tmp=tmp_path) for a in argv)]
    if argv[0] == "generate":
        cmd += ["--prompt", "hi"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in out.stderr.strip().splitlines() if not ln.startswith("Loading weights")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr
