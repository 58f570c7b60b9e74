"""``movekd extract --teachers A,B``: a cache of some of a config's teachers (issue 12: caches that
compose; v1.1 = the v1.0 cache + a SAM-only extraction). Keys agree across such caches of one pack:
tests/e2e/test_train_multicache.py."""

from __future__ import annotations

import json

from jobs.cli import main as cli_main


def test_teachers_selects_and_keeps_order_and_cls(capsys):
    assert cli_main(["extract", "--config", "tiny", "--teachers", "sam", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in cfg["teachers"]] == ["sam"] and cfg["cls_teacher"] is None
    assert cli_main(["extract", "--config", "tiny", "--teachers", "sam,clip", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in cfg["teachers"]] == ["clip", "sam"] and cfg["cls_teacher"] == "clip"


def test_unknown_teacher_is_one_line_exit_2(capsys):
    assert cli_main(["extract", "--config", "tiny", "--teachers", "sam,nope", "--print-config"]) == 2
    err = capsys.readouterr().err  # (the tiny preset writes its random teachers first: transformers' bars)
    ours = [line for line in err.splitlines() if line.startswith("movekd extract")]
    assert len(ours) == 1 and "['nope'] not among the config's teachers" in ours[0] and "'sam'" in ours[0]
    assert "Traceback" not in err
