"""Shared setup of the training benchmarks: real-photo data, teachers, caches and train configs,
all built in-process under one work directory (no Ray, no network).

- Data: ``bench.photo_pack``: distinct crops of real photos (scikit-image) at a COCO-like size,
  a LLaVA JSON with one stage-1 caption per crop, packed into WebDataset shards.
- Caches: the extraction worker every Ray actor runs (``ShardExtractor``), called in-process per
  shard plus the reserved no-image row, as ``tests/pipeline/test_extract.py`` does.
- Models: the ``tiny`` / ``train_tiny`` presets as shipped, or the scaled-down v1.0 shapes of
  ``bench_training.py`` (``scaled_student`` / ``scaled_teachers``; FLOPs are measured there).
- Configs go through the real parsers (``jobs.config.load_config``, ``TrainConfig.from_dict``), and the
  online-teacher mode reads a real extraction YAML (``write_extract_yaml``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # imported from a script in bench/: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# v1.0 shapes scaled down ~8x in width and token grid. Student: CLIP 112 px / 14 px = 8x8 tokens
# (v1.0: 24x24), 128-d; LLM Llama 512-d x 4 layers. Teachers keep v1.0's roles and token ratios
# to the student grid: CLIP = the student's architecture (own weights), EVA-02 at 160 px / 8 px =
# 20x20 tokens (v1.0 64x64 = 7x the student's), ConvNeXt-XXL stages at 384 px -> 12x12 x 256 ch
# (v1.0 32x32 x 3072).
STUDENT_VISION = dict(hidden=128, image_size=112, patch=14, layers=4, heads=4, intermediate=512)
STUDENT_LLM = dict(hidden=512, layers=4, heads=8, intermediate=1376)
EVA_KWARGS = dict(embed_dim=128, depth=3, num_heads=4, patch_size=8)
EVA_RESOLUTION = 160
CONVNEXT_KWARGS = dict(depths=[1, 1, 3, 1], dims=[32, 64, 128, 256])
CONVNEXT_RESOLUTION = 384


def rss_peak_mb() -> float:
    """This process's peak resident set size (``VmHWM`` of /proc/self/status; Linux). Not
    ``getrusage``'s ru_maxrss: on Linux that survives fork + exec, so a child would report its
    parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS needs Linux)")


def reset_rss_peak() -> bool:
    """Reset the peak RSS to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def photo_pack(root: str, n: int, size: int = 512, shard_size: int = 16) -> tuple[str, str]:
    """``bench.photo_pack``: ``n`` real-photo crops at ``size`` px with a stage-1 caption each,
    packed (reused if ``root`` already holds it); returns (packed dir, LLaVA JSON)."""
    from bench.photo_pack import pack_photos

    packed, data_json = os.path.join(root, "packed"), os.path.join(root, "data.json")
    if not os.path.isdir(packed):
        pack_photos(root, n, size=size, shard_size=shard_size)
    return packed, data_json


def extract_cache(
    packed_dir: str, out: str, teachers: list, codec: str, batch_size: int = 8, cls_teacher: str = "clip"
) -> str:
    """Extract every shard (and the no-image row) into a fresh cache ``out``, in-process
    (``pipeline.extract.extract_in_process``: the plan and worker every Ray actor runs)."""
    from pipeline.extract import extract_in_process
    from pipeline.extract_config import ExtractConfig

    if os.path.isdir(out):
        return out
    cfg = ExtractConfig(
        packed=packed_dir,
        out=out,
        teachers=tuple(teachers),
        codec=codec,
        batch_size=batch_size,
        cls_teacher=cls_teacher,
        device="cpu",
        decode_threads=2,
        progress=False,
    )
    report = extract_in_process(cfg)
    if not report.ok:
        raise RuntimeError(f"extraction into {out} failed: {report.shards_failed}")
    return out


def write_extract_yaml(path: str, teachers: list, cls_teacher: str = "clip") -> str:
    """An extraction config naming ``teachers`` (what ``--online-teachers`` reads)."""
    data = {
        "kind": "extract",
        "packed": None,
        "out": None,
        "cls_teacher": cls_teacher,
        "device": "cpu",
        "teachers": [t.to_dict() for t in teachers],
    }
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- the shipped tiny presets --------------------------------------------------------------------
def tiny_teachers(root: str) -> list:
    """The ``tiny`` extraction preset's teachers (CLIP, EVA-02, ConvNeXt, SAM), made under ``root``,
    with two widths raised so every codec applies: int4 quantises groups of 32 channels, and the
    preset's ConvNeXt ends at 48 channels and SAM's neck at 16. Here ConvNeXt's last stage has 64
    and SAM's neck 32; everything else (families, depths, resolutions, grids, seeds) is the preset's."""
    import timm
    import torch
    from transformers import SamVisionConfig, SamVisionModel

    from jobs.config import load_config
    from pipeline.teachers.tiny import TINY_FAMILIES, _save_hf, _save_timm

    specs = {t.name: t for t in load_config("tiny", {"tiny_teachers.dir": root}).teachers}
    convnext_kwargs = dict(specs["convnext"].model_kwargs, dims=[16, 24, 32, 64])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_FAMILIES.index("convnext"))
        model = timm.create_model(specs["convnext"].arch, pretrained=False, **convnext_kwargs)
        source = _save_timm(model, root, "convnext64")
    specs["convnext"] = dataclasses.replace(specs["convnext"], source=source, model_kwargs=convnext_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_FAMILIES.index("sam"))
        cfg = SamVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            output_channels=32,
            window_size=4,
            global_attn_indexes=[1],
            mlp_dim=64,
            initializer_range=0.02,
        )
        specs["sam"] = dataclasses.replace(specs["sam"], source=_save_hf(SamVisionModel(cfg), root, "sam32"))
    return list(specs.values())


def tiny_train_config(student_dir: str, **fields: Any):
    """The ``train_tiny`` preset with its tiny student under ``student_dir``, then ``fields``."""
    from jobs.config import load_config

    return load_config("train_tiny", {"tiny_student.dir": student_dir, **fields})


def scaled_train_config(student_paths: dict[str, str], **fields: Any):
    """The ``train_tiny`` preset (stage 1 recipe) with the scaled student instead of its tiny one."""
    from jobs.config import read_preset
    from student.config import TrainConfig

    _, data = read_preset("train_tiny")
    data.pop("tiny_student", None)
    data.update(student_paths)
    data.update(fields)
    return TrainConfig.from_dict(data)


# -- scaled-down v1.0 shapes -----------------------------------------------------------------------
def scaled_student(root: str) -> dict[str, str]:
    """Tokenizer, LLM and CLIP tower at the scaled shapes; returns the TrainConfig path fields."""
    from transformers import AutoTokenizer

    from student.tiny import make_tiny_clip_vision, make_tiny_llm, make_tiny_tokenizer

    paths = {k: os.path.join(root, k) for k in ("tokenizer", "llm", "vision")}
    if not os.path.isfile(os.path.join(paths["llm"], "config.json")):
        make_tiny_tokenizer(paths["tokenizer"])
        vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
        make_tiny_llm(paths["llm"], vocab_size=vocab, **STUDENT_LLM)
        make_tiny_clip_vision(paths["vision"], **STUDENT_VISION)
    return {"tokenizer": paths["tokenizer"], "llm": paths["llm"], "vision_tower": paths["vision"]}


def scaled_teachers(root: str) -> list:
    """CLIP (the student's architecture, other weights), EVA-02 and ConvNeXt-XXL at scaled shapes,
    random weights perturbed as in ``pipeline.teachers.tiny``, saved through the real formats."""
    import timm
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pipeline.teachers.base import TeacherSpec
    from pipeline.teachers.tiny import _perturb

    os.makedirs(root, exist_ok=True)
    v = STUDENT_VISION
    clip_dir = os.path.join(root, "clip")
    eva_file, convnext_file = os.path.join(root, "eva.safetensors"), os.path.join(root, "convnext.safetensors")
    if not os.path.isfile(convnext_file):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            cfg = CLIPVisionConfig(
                hidden_size=v["hidden"],
                intermediate_size=v["intermediate"],
                num_hidden_layers=v["layers"],
                num_attention_heads=v["heads"],
                image_size=v["image_size"],
                patch_size=v["patch"],
            )
            _perturb(CLIPVisionModel(cfg)).save_pretrained(clip_dir)
            eva = timm.create_model("eva02_large_patch14_224", pretrained=False, img_size=EVA_RESOLUTION, **EVA_KWARGS)
            convnext = timm.create_model("convnext_xxlarge", pretrained=False, **CONVNEXT_KWARGS)
            for model, path in ((eva, eva_file), (convnext, convnext_file)):
                save_file({k: t.contiguous() for k, t in _perturb(model).state_dict().items()}, path)
    return [
        TeacherSpec(name="clip", family="clip", source=clip_dir),
        TeacherSpec(
            name="eva",
            family="eva",
            source=eva_file,
            arch="eva02_large_patch14_224",
            resolution=EVA_RESOLUTION,
            model_kwargs=EVA_KWARGS,
        ),
        TeacherSpec(
            name="convnext",
            family="convnext",
            source=convnext_file,
            arch="convnext_xxlarge",
            resolution=CONVNEXT_RESOLUTION,
            model_kwargs=CONVNEXT_KWARGS,
        ),
    ]


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs visible (shared with other jobs), "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
