"""Every named preset in jobs/configs resolves (base chains, overrides) into a valid config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.extract_config import ExtractConfig, load_yaml_config, parse_override

ROOT = Path(__file__).resolve().parent.parent
EXTRACT_PRESETS = ["movekd_v1_0_pretrain", "movekd_v1_0_finetune", "movekd_v1_1_pretrain", "movekd_v1_1_finetune"]


@pytest.mark.parametrize("name", EXTRACT_PRESETS)
def test_extract_presets_resolve(name):
    cfg = ExtractConfig.from_dict(load_yaml_config(name, {"packed": "/p", "out": "/o"}))
    aspect = "pad" if "finetune" in name else "square"
    assert {t.aspect for t in cfg.teachers} == {aspect}
    names = [t.name for t in cfg.teachers]
    assert names[0] == "clip" and cfg.cls_teacher == "clip"
    assert ("sam" in names) == ("v1_1" in name)


def test_overrides_and_missing_fields():
    data = load_yaml_config(
        "movekd_v1_0_pretrain", dict([parse_override("teachers.1.resolution=448"), parse_override("batch_size=4")])
    )
    assert data["teachers"][1]["resolution"] == 448 and data["batch_size"] == 4
    with pytest.raises(ValueError, match=r"missing \['out', 'packed'\]"):
        ExtractConfig.from_dict(load_yaml_config("movekd_v1_0_pretrain"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_yaml_config("nope")


def test_base_chain_loop_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        load_yaml_config(tmp_path / "a.yaml")


def test_cli_print_config():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "extract",
            "--config",
            "movekd_v1_1_finetune",
            "--packed",
            "/p",
            "--out",
            "/o",
            "--print-config",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["dataset_name"] == "LLaVA-665K"
