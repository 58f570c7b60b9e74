"""What ``movekd VERB --help`` shows a person: plain text, not the docstrings' RST/markdown markup.

Descriptions are docstrings and help strings written for the source (````x````, ```x```); the
CLI's help formatter (``jobs.cli.ReadableHelpFormatter``) shows them as ``'x'`` and keeps a
docstring's bullet list as a list.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import VERBS, main

ROOT = Path(__file__).resolve().parent.parent
CACHE_COMMANDS = ["inspect", "verify", "show", "attn", "stats"]
ALL_HELP = [[], *[[v] for v in VERBS], *[["cache", c] for c in CACHE_COMMANDS]]


def help_of(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main([*argv, "--help"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("argv", ALL_HELP, ids=lambda a: " ".join(a) or "movekd")
def test_every_verbs_help_is_plain_text(argv, capsys):
    code, text = help_of(argv, capsys)
    assert code == 0, text
    assert "usage: movekd" in text
    assert "``" not in text, text
    assert "`" not in text, text  # single backticks (markdown code) too


def test_a_docstring_bullet_list_stays_a_list(capsys):
    code, text = help_of(["answer"], capsys)
    assert code == 0
    lines = text.splitlines()
    bullets = [ln for ln in lines if ln.startswith("- ")]
    assert [b.split(":")[0] for b in bullets] == ["- 'generate'", "- 'answer'", "- 'evaluate'"], text


def test_plain_text_rules():
    from jobs.cli import plain_text

    assert plain_text("``movekd pack``: the `out` of :func:`pack_dataset`, **not** step-*/") == (
        "'movekd pack': the 'out' of 'pack_dataset', not step-*/"
    )
    assert plain_text("LLaVA's ``model_vqa_loader.py``") == "LLaVA's 'model_vqa_loader.py'"
    assert plain_text("Submit it as a Ray job::") == "Submit it as a Ray job:"


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="the eval extra is not installed")
def test_lmms_eval_help_passes_through(capsys):
    code, text = help_of(["lmms-eval"], capsys)
    assert code == 0 and "usage: lmms-eval" in text and "``" not in text


@pytest.mark.slow  # a fresh interpreter: the installed entry point's path (python -m jobs.cli)
def test_help_in_a_real_process():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "generate", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and "``" not in out.stdout and "- 'generate': answer one prompt" in out.stdout
