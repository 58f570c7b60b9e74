"""Every shipped preset resolves (kind, base chains, overrides, tiny blocks) into a valid config,
and the configuration layer (``jobs.config``) names what is wrong."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import list_presets, load_config, parse_override, read_preset
from pipeline.extract_config import ExtractConfig
from student.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {
    "movekd_v1_0_pretrain": "extract",
    "movekd_v1_0_finetune": "extract",
    "movekd_v1_1_pretrain": "extract",
    "movekd_v1_1_finetune": "extract",
    "tiny": "extract",
    "train_tiny": "train",
    "train_v1_0_pretrain": "train",
    "train_v1_0_finetune": "train",
    "train_v1_1_pretrain": "train",
    "train_v1_1_finetune": "train",
}


def test_the_shipped_presets_are_the_listed_ones():
    assert list_presets() == SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_preset_resolves(name, tmp_path):
    overrides = {"tiny_teachers.dir": str(tmp_path / "t")} if name == "tiny" else {}
    if name == "train_tiny":
        overrides = {"tiny_student.dir": str(tmp_path / "s")}
    cfg = load_config(name, overrides)
    assert isinstance(cfg, ExtractConfig if SHIPPED[name] == "extract" else TrainConfig)
    again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))  # what --print-config shows round-trips
    assert again == cfg


@pytest.mark.parametrize("name", [n for n, k in SHIPPED.items() if k == "extract" and n.startswith("movekd")])
def test_extract_presets_hold_the_released_teacher_sets(name):
    cfg = load_config(name, {"packed": "/p", "out": "/o"})
    aspect = "pad" if "finetune" in name else "square"
    assert {t.aspect for t in cfg.teachers} == {aspect}
    names = [t.name for t in cfg.teachers]
    assert names[0] == "clip" and cfg.cls_teacher == "clip"
    assert names == (["clip", "sam", "eva", "convnext"] if "v1_1" in name else ["clip", "eva", "convnext"])
    eva = cfg.teachers[names.index("eva")]  # the released EVA-02-L ViTDet, not timm's EVA-02 (family eva)
    assert (eva.family, eva.source, eva.resolution) == ("eva_vitdet", "", 1024)
    index = names.index("eva")
    with_file = load_config(name, {"packed": "/p", "out": "/o", f"teachers.{index}.source": "/w/eva02.pth"})
    assert with_file.teachers[index].source == "/w/eva02.pth"  # the override the preset's comment gives
    comment = (ROOT / "jobs" / "configs" / f"{name.replace('finetune', 'pretrain')}.yaml").read_text()
    assert f"--set teachers.{index}.source=" in comment


def test_stage_recipes_are_written_once():
    """Stage 1 = TrainConfig's defaults (docs/method.md §7); stage 2 = the finetune preset only."""
    pre, ft = load_config("train_v1_0_pretrain"), load_config("train_v1_0_finetune")
    defaults = TrainConfig()
    recipe = (
        "stage",
        "lr",
        "batch_size",
        "template",
        "image_aspect_ratio",
        "epochs",
        "warmup_ratio",
        "weight_decay",
        "vision_tower",
        "llm",
        "gradient_checkpointing",
        "tune_vision_base",
    )
    assert {k: getattr(pre, k) for k in recipe} == {k: getattr(defaults, k) for k in recipe}
    assert (pre.lr, pre.batch_size, pre.template, pre.image_aspect_ratio) == (1e-3, 16, "plain", "square")
    assert (ft.stage, ft.lr, ft.batch_size, ft.template, ft.image_aspect_ratio) == (
        "finetune",
        2e-5,
        8,
        "vicuna_v1",
        "pad",
    )
    assert ft.group_by_modality_length and ft.tune_vision_base and ft.init_from.endswith("pretrain/export")
    _, raw = read_preset("train_v1_0_pretrain")
    assert not set(raw) & {"lr", "batch_size", "template", "image_aspect_ratio", "epochs"}  # not restated


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_v1_1_training_differs_from_v1_0_only_where_the_released_scripts_do(stage):
    """scripts/move-kd/{pretrain,finetune}-v1.1.sh differ from v1.0 in the teacher set (the cache),
    the output dir and stage 2's init; SAM's adapter input follows the released layout."""
    v10, v11 = load_config(f"train_v1_0_{stage}").to_dict(), load_config(f"train_v1_1_{stage}").to_dict()
    diff = {k for k in v10 if v10[k] != v11[k]}
    assert diff == ({"output_dir", "init_from"} if stage == "finetune" else {"output_dir"})
    assert v11["sam_layout"] == "released" and v11["output_dir"] == f"runs/movekd-v1.1-{stage}"
    if stage == "finetune":
        assert v11["init_from"] == "runs/movekd-v1.1-pretrain/export"


def test_overrides_and_missing_fields():
    _, data = read_preset(
        "movekd_v1_0_pretrain", dict([parse_override("teachers.1.resolution=448"), parse_override("batch_size=4")])
    )
    assert data["teachers"][1]["resolution"] == 448 and data["batch_size"] == 4
    cfg = load_config("movekd_v1_0_pretrain")
    with pytest.raises(ValueError, match=r"missing \['out', 'packed'\]"):
        cfg.require_io()
    with pytest.raises(FileNotFoundError, match="nope"):
        load_config("nope")
    with pytest.raises(ValueError, match=r"override 'teachers\.9\.resolution': that path does not exist"):
        read_preset("movekd_v1_0_pretrain", {"teachers.9.resolution": 1})
    with pytest.raises(ValueError, match=r"extraction config: unknown field\(s\) \['batchsize'\]"):
        load_config("movekd_v1_0_pretrain", {"batchsize": 3})
    with pytest.raises(ValueError, match=r"TrainConfig: unknown field\(s\) \['lrr'\]"):
        load_config("train_v1_0_pretrain", {"lrr": 3})


def test_kind_is_checked(tmp_path):
    with pytest.raises(ValueError, match="is a train preset; run it with `movekd train`"):
        load_config("train_v1_0_pretrain", kind="extract")
    (tmp_path / "mine.yaml").write_text("packed: /p\nout: /o\nteachers: [{name: clip, family: clip}]\n")
    assert load_config(tmp_path / "mine.yaml", kind="extract").teachers[0].name == "clip"  # kind from the caller
    with pytest.raises(ValueError, match="'kind' must be one of"):
        load_config(tmp_path / "mine.yaml")
    (tmp_path / "var.yaml").write_text("base: movekd_v1_0_pretrain\ncodec: ecsq\n")  # kind from the base
    cfg = load_config(tmp_path / "var.yaml")
    assert cfg.codec == "ecsq" and dataclasses.replace(cfg, codec="int8") == load_config("movekd_v1_0_pretrain")


def test_base_chain_loop_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        load_config(tmp_path / "a.yaml")


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


def test_cli_config_errors_are_one_line_and_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "train", "--config", "movekd_v1_0_pretrain", "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "movekd train: bad config: config 'movekd_v1_0_pretrain' is an extract preset; run it with `movekd extract`"
    )


# -- values are typed at the edge (issue 11, item 11) ---------------------------------------------


def _train_print(*sets: str):
    from jobs.train import main as train_main

    argv = ["--config", "train_v1_0_pretrain", "--print-config"]
    for s in sets:
        argv += ["--set", s]
    return train_main(argv)


def test_set_lr_2e_minus_5_is_a_float(capsys):
    """YAML 1.1 reads '2e-5' as a string; `--set lr=2e-5` is the example in `movekd train --help`."""
    assert _train_print("lr=2e-5", "batch_size=8", "mole.rank=16") == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["lr"] == 2e-5 and isinstance(cfg["lr"], float)
    assert cfg["batch_size"] == 8 and cfg["mole"]["rank"] == 16


@pytest.mark.parametrize(
    "override, named",
    [
        ("batch_size=four", "TrainConfig.batch_size: expected int, got 'four' (str)"),
        ("lr=fast", "TrainConfig.lr: expected float, got 'fast' (str)"),
        ("lr=true", "TrainConfig.lr: expected float, got True (bool)"),
        ("gradient_checkpointing=maybe", "TrainConfig.gradient_checkpointing: expected bool, got 'maybe'"),
        ("mole.rank=1.5", "rank: expected int, got 1.5 (float)"),
        ("batchsize=8", "unknown field(s) ['batchsize']; valid fields:"),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_type(override, named, capsys):
    assert _train_print(override) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err


def test_strict_scalars():
    from dataclasses import dataclass

    from cache.strict import from_mapping

    @dataclass(frozen=True)
    class C:
        f: float = 0.0
        i: int = 0
        b: bool = False
        s: str = ""
        o: int | None = None
        t: tuple[int, ...] = ()

    c = from_mapping(C, {"f": 1, "i": "3", "b": "false", "s": None, "o": None, "t": ["1", 2]})
    assert (c.f, c.i, c.b, c.s, c.o, c.t) == (1.0, 3, False, "", None, (1, 2))
    assert isinstance(c.f, float)
    for bad in ({"s": 5}, {"i": True}, {"i": 2.5}, {"t": ["x"]}):
        with pytest.raises(ValueError, match="expected"):
            from_mapping(C, bad)
