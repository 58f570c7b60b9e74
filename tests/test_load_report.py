"""Loading the vision tower of a full CLIPModel checkpoint (what the released CLIP is) says so in
one line, through both real loaders (the CLIP teacher's and the student's), instead of
transformers' key-by-key "LOAD REPORT"; a checkpoint that lacks vision weights still fails, and
then transformers' report is printed too.

transformers writes its report through its own stderr handler (``capfd`` sees it; it does not
propagate to the root logger unless ``CI`` is set, when ``caplog`` sees it), the loaders' line goes
through the ``movekd.load`` logger (``caplog``). The extraction worker collects its teachers'
lines so a runner says them once (not once per Ray actor).
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from pipeline.teachers import TeacherSpec, build_teacher

LOAD_NOTES = "movekd.load"  # cache.load_report.LOAD_NOTES: the loaders' one-line notes

TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)
TRANSFORMERS_SAYS = ("LOAD REPORT", "UNEXPECTED", "MISSING")


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory):
    """A tiny CLIPModel checkpoint (text tower, projections, logit scale) and its weight count."""
    path = tmp_path_factory.mktemp("clip-full")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION))
    model.eval().save_pretrained(path)
    keys = load_file(path / "model.safetensors").keys()
    return path, len([k for k in keys if not k.startswith("vision_model.")])


@pytest.fixture(scope="module")
def partial_clip(full_clip, tmp_path_factory):
    """The same checkpoint without the last vision encoder layer."""
    src, _ = full_clip
    path = tmp_path_factory.mktemp("clip-partial")
    weights = load_file(src / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".encoder.layers.2." not in k},
        path / "model.safetensors",
        {"format": "pt"},
    )
    (path / "config.json").write_text((src / "config.json").read_text())
    return path


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOAD_NOTES]


def transformers_report(capfd, caplog) -> str:
    said = capfd.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
    return "\n".join(ln for ln in said.splitlines() if any(w in ln for w in TRANSFORMERS_SAYS))


@pytest.mark.parametrize("loader", ["teacher", "student"])
def test_a_full_clip_checkpoint_loads_with_one_line(full_clip, loader, capfd, caplog):
    path, dropped = full_clip
    caplog.set_level(logging.INFO)
    if loader == "teacher":
        build_teacher(TeacherSpec(name="clip", family="clip", source=str(path), resolution=32))
    else:
        from student.llava import load_vision_tower

        load_vision_tower(path)
    assert transformers_report(capfd, caplog) == ""
    (line,) = notes(caplog)
    who = "clip" if loader == "teacher" else "student"
    assert line.startswith(f"{who}: loaded CLIPVisionModel from {path} (a CLIPModel checkpoint); dropped its {dropped}")
    assert "text_model.* (" in line and "which a vision encoder does not use" in line
    assert "\n" not in line


@pytest.mark.parametrize("loader", ["teacher", "student"])
def test_missing_vision_weights_are_still_an_error_with_transformers_report(partial_clip, loader, capfd, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(ValueError, match=r"encoder\.layers\.2\."):
        if loader == "teacher":
            build_teacher(TeacherSpec(name="clip", family="clip", source=str(partial_clip), resolution=32))
        else:
            from student.llava import load_vision_tower

            load_vision_tower(partial_clip)
    report = transformers_report(capfd, caplog)
    assert "LOAD REPORT" in report and "MISSING" in report, report
    assert notes(caplog) == []


def test_the_extraction_worker_collects_its_teachers_lines(full_clip, tmp_path, caplog):
    """A worker (one per Ray actor) logs nothing while loading; its notes go to the runner."""
    from pipeline.extract_config import ExtractConfig
    from pipeline.extract_worker import ShardExtractor
    from tests.helpers.datasets import pack_crops

    path, dropped = full_clip
    packed = pack_crops(str(tmp_path / "data"), n=2, shard_size=2)
    spec = TeacherSpec(name="clip", family="clip", source=str(path), resolution=32)
    cfg = ExtractConfig(packed=packed.root, out=str(tmp_path / "cache"), teachers=(spec,), progress=False)
    caplog.set_level(logging.WARNING)  # as in a Ray worker: logging not configured, INFO off
    worker = ShardExtractor(cfg)
    assert notes(caplog) == []
    (line,) = worker.load_notes()
    assert line.startswith("clip: loaded CLIPVisionModel") and f"dropped its {dropped}" in line
    from pipeline.extract import extract_in_process

    caplog.set_level(logging.INFO)  # the driver's logging (the CLI's)
    assert extract_in_process(cfg, worker).ok
    assert notes(caplog) == [line]  # the runner says it, once
