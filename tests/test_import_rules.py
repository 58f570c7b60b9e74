"""The house's import direction: jobs -> {pipeline, student} -> cache; cache imports no torch/ray.

Checked two ways: statically over every import statement in the source (including ones inside
functions), and dynamically by importing every cache module in a fresh interpreter and checking
that torch and ray were never loaded.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "cache": {"torch", "ray", "pipeline", "student", "jobs", "movekd_compat"},
    "pipeline": {"student", "jobs"},
    "student": {"pipeline", "jobs"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_wrong_way_imports(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, mod in imported_modules(path):
            if mod.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "imports against the house direction:\n" + "\n".join(bad)


def test_checker_catches_a_wrong_way_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from student.mole import add_mole\n    import torch\n")
    assert [m for _, m in imported_modules(f)] == ["student.mole", "torch"]


def test_cache_loads_without_torch_or_ray():
    mods = sorted(p.stem for p in (ROOT / "cache").glob("*.py") if p.stem != "__main__")
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module('cache.' + m if m != '__init__' else 'cache')\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'ray'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# movekd_compat is process set-up: only entry points may call it (never at library import time).
COMPAT_CALLERS = {"jobs/cli.py"}


def test_only_entry_points_set_up_torchvision():
    bad = []
    for package in ("cache", "pipeline", "student", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in COMPAT_CALLERS:
                continue
            bad += [f"{rel}:{line}" for line, mod in imported_modules(path) if mod == "movekd_compat"]
    assert not bad, "library modules must not import movekd_compat (call it at an entry point):\n" + "\n".join(bad)


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.slow  # a fresh interpreter importing timm and transformers
def test_cli_entry_point_makes_timm_and_transformers_importable():
    code = (
        "import sys\n"
        "from jobs.cli import prepare_process\n"
        "assert 'movekd_compat' not in sys.modules  # importing the CLI does nothing by itself\n"
        "prepare_process('extract')\n"
        "import timm\n"
        "from transformers import CLIPVisionModel, CLIPImageProcessor\n"
        "print(timm.create_model('convnext_atto', pretrained=False).num_features)\n"
    )
    assert _fresh(code) == "320"


def test_cache_verb_stays_free_of_torch():
    code = (
        "import sys\n"
        "from jobs.cli import main\n"
        "try:\n    main(['cache', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'movekd_compat'}))\n"
    )
    assert _fresh(code).splitlines()[-1] == "[]"


@pytest.mark.parametrize("package", ["cache", "pipeline", "student", "jobs"])
def test_no_import_cycles_inside_a_package(package):
    """Every import (function-level ones included) between a package's modules points one way."""
    root = ROOT / package
    mods = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in root.rglob("*.py")
    }
    graph = {m: {d for _, d in imported_modules(p) if d in mods and d != m and d != package} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
