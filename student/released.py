"""Released MoVE-KD checkpoints: ``load_released(dir)`` into this project's student, and
``export_llava(model, dir)`` back to that layout (what LLaVA's / MoVE-KD's eval scripts load).

A released checkpoint folder is what ``llava/train/train.py`` writes at the end of stage 2 (HF
``save_pretrained`` of ``MoVELlavaLlamaForCausalLM``): ``config.json`` (``student.released_config``)
and the whole state dict, as sharded safetensors (``model.safetensors.index.json``), one
``model.safetensors``, or ``pytorch_model.bin[.index.json]``; usually the tokenizer too.

Decisions:
- Key names: ``student.released_keys.RULES``, one explicit table used both ways.
- Strict: every released key is loaded, or is a known recomputed buffer (old transformers'
  ``position_ids``/``rotary_emb.inv_freq``, checked against the recomputed value and reported);
  unknown keys, missing keys and shape mismatches are one ``ValueError`` listing them.
- ``.bin`` files are read with ``torch.load(weights_only=True)``: a file that needs pickle is
  refused with a message saying how to convert it. Shards are read one at a time.
- The CLIP config is not in the folder (LLaVA rebuilds the tower from ``mm_vision_tower``): it
  comes from ``mm_vision_tower`` or ``vision_tower=`` (a folder or a cached hub name).
- Adapters are rebuilt from the shapes of ``<teacher>_adapter_1/2`` (``TokenLinearAdapter``; SAM in
  the released layout unless ``sam_layout="honest"``); grids default to squares, ``grids=`` (the
  cache's) overrides. Teachers: ``clip`` (no adapter) plus the adapters found.
- MoLE: ``num_experts``/``rank``/``alpha`` from ``moe``; the rest (dropout 0.05, biases) are the
  released constants, ``MoLEConfig``'s defaults. A given ``mole=`` must agree on the three.
- Export writes HF's layout (safetensors shards of at most ``max_shard_bytes`` + index, metadata
  ``format: pt``) into ``<dir>.tmp``, then renames it into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, LlamaForCausalLM
from transformers.initialization import no_init_weights

from cache.manifest import PreprocessSpec
from student.adapters import TokenLinearAdapter, released_sam_geometry
from student.distill_model import DistillModel
from student.export import _replace_dir
from student.kd_loss import KDConfig
from student.llava import LlavaStudent, build_projector
from student.mole import MoLEConfig, MoLEMLP, _encoder_layers, add_mole
from student.released_config import ReleasedConfig, parse_released_config, released_config_dict
from student.released_keys import (
    RELEASED_TEACHERS,
    build_rules,
    is_ignored,
    map_released_key,
    project_tensors,
    released_key_map,
)

log = logging.getLogger(__name__)
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
CLIP_NAME = "clip"


# -- reading a folder ------------------------------------------------------------------------------
def read_released_config(path) -> ReleasedConfig:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path}: no config.json (not a released MoVE-KD / LLaVA checkpoint folder)")
    return parse_released_config(json.loads(file.read_text()))


def weight_files(path) -> tuple[list[Path], dict[str, str] | None]:
    """The folder's weight files (and the index's key -> file map, when sharded)."""
    path = Path(path)
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file], None
        weight_map = json.loads(file.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{file}: no 'weight_map' in the index")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{file}: shard(s) {missing} named by the index are not in the folder")
        return [path / f for f in files], weight_map
    raise ValueError(
        f"{path}: no weights ({', '.join(WEIGHT_FILES)}); a stage-1 folder (mm_projector.bin, "
        "mole_encoder.bin, encoder_adapter.bin only) is not a full checkpoint"
    )


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{file}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); it needs "
            "pickle: convert it once, where you trust it, with safetensors.torch.save_file(torch.load(f), "
            "'model.safetensors')"
        ) from None
    except RuntimeError:  # legacy (pre-zip) format cannot be mmapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: not a state dict of tensors")
    return state


def _shard_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if file.suffix == ".safetensors":
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in _load_bin(file).items()}


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    return load_file(str(file)) if file.suffix == ".safetensors" else _load_bin(file)


def released_shapes(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, tuple[int, ...]]:
    """Every released key's shape; an index that disagrees with its shards is an error."""
    shapes, where = {}, {}
    for file in files:
        for key, shape in _shard_shapes(file).items():
            if key in shapes:
                raise ValueError(f"key {key!r} is in both {where[key]} and {file.name}")
            shapes[key], where[key] = shape, file.name
    if weight_map is not None:
        wrong = sorted(k for k in set(weight_map) | set(where) if weight_map.get(k) != where.get(k))
        if wrong:
            raise ValueError(f"the index and the shards disagree on {len(wrong)} key(s): {wrong[:8]}")
    return shapes


# -- building the student ------------------------------------------------------------------------
def released_vision_config(source: str):
    """The CLIP vision config of ``source`` (a folder or a cached hub name), for the tower."""
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"mm_vision_tower {source!r}: cannot read its CLIP config ({str(e).splitlines()[0]}); pass "
            "vision_tower=<a CLIP folder or cached hub name> (movekd: --set vision_tower=...)"
        ) from None
    config = getattr(config, "vision_config", config)
    if config.model_type != "clip_vision_model":
        raise ValueError(f"mm_vision_tower {source!r} is a {config.model_type!r}, not a CLIP vision tower")
    return config


def _mole_config(rc: ReleasedConfig, mole: MoLEConfig | None) -> MoLEConfig:
    released = {"num_experts": rc.num_experts, "rank": rc.rank, "alpha": rc.alpha}
    if mole is None:
        return dataclasses.replace(MoLEConfig(), **released)
    for name, value in released.items():
        if getattr(mole, name) != value:
            field = f"moe.moe_encoder_{'lora_' if name != 'num_experts' else ''}{name}"
            raise ValueError(f"config.json {field} = {value!r} but mole.{name} = {getattr(mole, name)!r}")
    if mole.layers is not None or not mole.lora_bias or mole.gate_scaling:
        raise ValueError(
            "the released MoLE is on every layer, with LoRA biases, without gate scaling: "
            "set mole.layers: null, mole.lora_bias: true, mole.gate_scaling: false"
        )
    return mole


def _adapter(teacher: str, shapes: Mapping, sam_layout: str, grid) -> TokenLinearAdapter:
    k1, k2 = f"{teacher}_adapter_1.weight", f"{teacher}_adapter_2.weight"
    missing = [k for k in (k1, k2) if k not in shapes]
    if missing:
        raise ValueError(f"adapter {teacher!r} is incomplete: missing {missing}")
    (dim, in_channels), (student_tokens, in_tokens) = shapes[k1], shapes[k2]
    if teacher == "sam" and sam_layout == "released":  # undo released_sam_geometry
        h, w = grid if grid is not None else (in_channels // 4, in_channels // 4)
        channels = 4 * in_tokens // h
        if released_sam_geometry((h, w), channels) != (in_tokens, in_channels):
            raise ValueError(f"sam adapter {in_tokens}x{in_channels} does not fit a {h}x{w} neck grid")
        return TokenLinearAdapter(channels, h * w, dim, student_tokens, "released_sam", (h, w))
    side = math.isqrt(in_tokens)
    grid = grid if grid is not None else ((side, side) if side * side == in_tokens else None)
    return TokenLinearAdapter(in_channels, in_tokens, dim, student_tokens, "row_major", grid)


def _build(rc, vision_cfg, mole, shapes, dtype, attn, sam_layout, grids, kd) -> DistillModel:
    if rc.mm_hidden_size != vision_cfg.hidden_size:
        raise ValueError(
            f"config.json mm_hidden_size = {rc.mm_hidden_size} but the CLIP tower is {vision_cfg.hidden_size} wide"
        )
    with no_init_weights():  # every base weight is overwritten from the checkpoint (strictly)
        vision = CLIPVisionModel._from_config(vision_cfg, dtype=dtype, attn_implementation=attn)
        llm = LlamaForCausalLM._from_config(rc.llm, dtype=dtype, attn_implementation=attn)
    add_mole(vision, mole, freeze_base=True)
    projector = build_projector(rc.projector, vision_cfg.hidden_size, rc.llm.hidden_size).to(dtype)
    llava = LlavaStudent(vision, projector, llm, rc.vision_layer, num_prefix_tokens=1)
    found = [t for t in RELEASED_TEACHERS if any(k.startswith(f"{t}_adapter_") for k in shapes)]
    adapters = nn.ModuleDict({t: _adapter(t, shapes, sam_layout, (grids or {}).get(t)) for t in found})
    return DistillModel(llava, adapters.to(dtype), (CLIP_NAME, *found), CLIP_NAME, kd or KDConfig(), mole)


def load_released(
    path,
    *,
    vision_tower: str | None = None,
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    mole: MoLEConfig | None = None,
    kd: KDConfig | None = None,
    sam_layout: str = "released",
    grids: Mapping[str, tuple[int, int]] | None = None,
) -> DistillModel:
    """A released MoVE-KD checkpoint folder as this project's ``DistillModel`` (eval mode, fp32
    unless ``torch_dtype``; trainable flags as ``load_pretrained``: MoLE only).

    ``vision_tower`` overrides ``mm_vision_tower`` as the source of the CLIP config; ``mole``
    (e.g. a run's ``TrainConfig.mole``) must agree with the checkpoint's MoLE fields."""
    path = Path(path)
    rc = read_released_config(path)
    files, weight_map = weight_files(path)
    shapes = released_shapes(files, weight_map)
    vision_cfg = released_vision_config(vision_tower or rc.mm_vision_tower)
    mole_cfg = _mole_config(rc, mole)
    dtype = torch_dtype or torch.float32
    with torch.random.fork_rng(devices=[]):
        model = _build(rc, vision_cfg, mole_cfg, shapes, dtype, attn_implementation, sam_layout, grids, kd)
    ignored = load_released_weights(model, files, rc.projector)
    if ignored:
        log.info("%s: skipped %d recomputed buffer(s), e.g. %s", path, len(ignored), ignored[0])
    return model.eval()


def released_inference(path, vision_tower: str | None = None) -> dict:
    """The export ``inference`` record of a released checkpoint: vicuna_v1, its tower size and aspect."""
    rc = read_released_config(path)
    size = int(released_vision_config(vision_tower or rc.mm_vision_tower).image_size)
    spec = PreprocessSpec(resolution=size, aspect=rc.image_aspect_ratio)
    return {"template": "vicuna_v1", "preprocess": spec.to_dict()}


# -- weights --------------------------------------------------------------------------------------
def _check_ignored(model: DistillModel, key: str, value: torch.Tensor) -> None:
    if key.endswith("position_ids"):
        want = torch.arange(value.shape[-1]).expand_as(value)
    else:
        want = model.llava.llm.model.rotary_emb.inv_freq
    if value.shape != want.shape or not torch.allclose(value.float(), want.float().cpu(), rtol=1e-4, atol=0):
        raise ValueError(f"released buffer {key!r} differs from the one this model computes (config mismatch?)")


def load_released_weights(model: DistillModel, files: list[Path], projector: str) -> list[str]:
    """Copy every released tensor into ``model`` by the key map; returns the skipped buffer keys.

    Raises one ``ValueError`` listing unknown keys, missing keys and shape mismatches."""
    mole = model.mole_config
    rules = build_rules(projector, tuple(model.adapters))
    tensors = project_tensors(model)
    key_map = released_key_map(tensors, rules, mole.num_experts, mole.rank)
    seen, unknown, ignored, shapes = set(), [], [], []
    with torch.no_grad():
        for file in files:
            for key, value in _load_shard(file).items():
                seen.add(key)
                if key not in key_map:
                    if is_ignored(key):
                        _check_ignored(model, key, value)
                        ignored.append(key)
                    else:
                        unknown.append(key)
                    continue
                name, slot = key_map[key]
                dst = slot.view(tensors[name])
                if dst.shape != value.shape:
                    shapes.append(f"{key} {tuple(value.shape)} -> {name} {tuple(dst.shape)}")
                    continue
                dst.copy_(value)
    _raise_mismatch(sorted(unknown), sorted(set(key_map) - seen), shapes, rules, mole.rank)
    return ignored


def _raise_mismatch(unknown, missing, shapes, rules, rank) -> None:
    if not (unknown or missing or shapes):
        return
    parts = []
    if unknown:
        hints = [f"{k} (-> {hit[0] if (hit := map_released_key(k, rules, rank)) else 'no rule'})" for k in unknown[:12]]
        parts.append(f"{len(unknown)} unexpected key(s) the student has no tensor for: {', '.join(hints)}")
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:12])}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:8])}")
    raise ValueError("released checkpoint does not match the student it describes: " + " | ".join(parts))


# -- export ---------------------------------------------------------------------------------------
def _check_exportable(model: DistillModel, include_adapters: bool) -> None:
    layers = _encoder_layers(model.vision_tower)
    mole = model.mole_config
    if not all(isinstance(layer.mlp, MoLEMLP) for layer in layers) or mole.gate_scaling or not mole.lora_bias:
        raise ValueError("the released layout has MoLE (with LoRA biases, no gate scaling) on every CLIP layer")
    if model.llava.num_prefix_tokens != 1:
        raise ValueError("the released layout drops exactly the CLS token (mm_vision_select_feature 'patch')")
    if not include_adapters:
        return
    for name, a in model.adapters.items():
        want = "released_sam" if name == "sam" else "row_major"
        if name not in RELEASED_TEACHERS or not isinstance(a, TokenLinearAdapter) or a.layout != want:
            raise ValueError(
                f"adapter {name!r} ({type(a).__name__}) has no released counterpart (released: token_linear "
                f"adapters for {list(RELEASED_TEACHERS)}, SAM in its released layout); export without adapters"
            )


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_weights(state: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    shards = _plan_shards(state, max_bytes)
    if len(shards) == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_llava(
    model: DistillModel,
    out_dir,
    mm_vision_tower: str,
    *,
    tokenizer=None,
    image_aspect_ratio: str = "pad",
    dtype: torch.dtype | None = None,
    include_adapters: bool = True,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model`` as a released MoVE-KD checkpoint folder (config.json, safetensors with the
    released key names, tokenizer); ``load_released`` and the released eval scripts read it.

    ``mm_vision_tower`` is what LLaVA loads the CLIP config/processor from (the student's base
    tower, e.g. ``openai/clip-vit-large-patch14-336``); ``dtype`` casts (default: as stored)."""
    _check_exportable(model, include_adapters)
    mole = model.mole_config
    tensors = project_tensors(model)
    if not include_adapters:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("adapters.")}
    rules = build_rules(model.llava.projector.kind, tuple(model.adapters) if include_adapters else ())
    key_map = released_key_map(tensors, rules, mole.num_experts, mole.rank)
    state = {}
    for key, (name, slot) in key_map.items():
        t = slot.view(tensors[name]).detach().cpu()
        state[key] = t.to(dtype or t.dtype).clone(memory_format=torch.contiguous_format)
    stored = next(iter(state.values())).dtype
    llm = model.llava.llm.config
    config = released_config_dict(
        llm,
        mm_vision_tower=mm_vision_tower,
        mm_hidden_size=model.vision_tower.config.hidden_size,
        projector=model.llava.projector.kind,
        vision_layer=model.llava.vision_layer,
        image_aspect_ratio=image_aspect_ratio,
        num_experts=mole.num_experts,
        rank=mole.rank,
        alpha=mole.alpha,
        dtype=str(stored).removeprefix("torch."),
        tokenizer_max_length=getattr(tokenizer, "model_max_length", None),
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(state, tmp, max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out)
    return out
