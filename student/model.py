"""Building the distillation model for a run: ``build_student(cfg, manifest) -> DistillModel``.

``DistillModel`` itself lives in ``student.distill_model``; ``set_trainable`` (``student.trainable``)
picks the stage's parameters; ``export_pretrained``/``load_pretrained`` (``student.export``) save
and load a trained student. Imports point one way: model -> export -> distill_model.

Decisions:
- Teachers: the config's list (default every teacher in the cache, in manifest order); the
  cache's ``cls_teacher`` is the KD's "CLIP" (raw targets, fixed 0.8 weight in the released rule).
  A cache without a ``cls_teacher`` only works with uniform token and fixed teacher weights.
- Building is seeded (``torch.random.fork_rng`` + ``cfg.seed``): every rank and every rebuild
  gets the same fresh MoLE/projector/adapter init, and the caller's RNG is left untouched.
- The model builder picks ``attn_implementation``: flash-attention-2 when installed, on CUDA,
  with bf16; else SDPA (``student.llava.default_attn_implementation``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cache.manifest import CacheManifest
from student.adapters import adapters_from_manifest
from student.config import TrainConfig
from student.distill_model import DistillModel
from student.export import check_compatible, load_pretrained
from student.kd_loss import KDConfig
from student.llava import LlavaStudent, build_llava, default_attn_implementation
from student.mole import add_mole
from student.released import load_released
from student.trainable import set_trainable

log = logging.getLogger(__name__)


def resolve_teachers(cfg: TrainConfig, manifest: CacheManifest) -> tuple[str, ...]:
    """The configured teachers (all of the cache's when None), in manifest order; checked."""
    names = manifest.teacher_names
    if cfg.teachers is None:
        return names
    unknown = sorted(set(cfg.teachers) - set(names))
    if unknown:
        raise ValueError(f"TrainConfig.teachers {unknown} are not in the cache (it has {list(names)})")
    return tuple(n for n in names if n in cfg.teachers)


def _check_cls_needs(kd: KDConfig, manifest: CacheManifest) -> None:
    if manifest.cls_teacher is None and (kd.token_weighting == "attention" or kd.teacher_weighting != "fixed"):
        raise ValueError(
            "this cache has no cls_teacher (no CLS attention/state stored): use "
            "KDConfig(token_weighting='uniform', teacher_weighting='fixed')"
        )


def student_geometry(llava: LlavaStudent) -> tuple[int, int]:
    """(patch-token width, patch-token count) of the student tower (the KD token space)."""
    config = llava.vision_tower.config
    return config.hidden_size, (config.image_size // config.patch_size) ** 2


def _attn(cfg: TrainConfig, dtype: torch.dtype | None) -> str:
    return cfg.attn_implementation or default_attn_implementation(dtype)


def build_student(cfg: TrainConfig, manifest: CacheManifest, compute_dtype: torch.dtype | None = None) -> DistillModel:
    """Assemble the student for ``cfg`` against a cache, fp32 weights, trainable set per stage.

    ``compute_dtype`` (the autocast dtype, e.g. bf16 on CUDA) only picks the attention kernel.
    With ``cfg.init_from`` the student starts from a previous stage's ``export_pretrained`` dir,
    with ``cfg.init_from_released`` from a released MoVE-KD checkpoint (``student.released``).
    """
    teachers = resolve_teachers(cfg, manifest)
    _check_cls_needs(cfg.kd, manifest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            model = _from_previous_stage(cfg, manifest, teachers, _attn(cfg, compute_dtype))
        elif cfg.init_from_released:
            model = _from_released(cfg, manifest, teachers, _attn(cfg, compute_dtype))
        else:
            model = _fresh(cfg, manifest, teachers, _attn(cfg, compute_dtype))
    set_trainable(model, cfg.stage, cfg.tune_vision_base)
    if cfg.gradient_checkpointing:
        model.llava.set_gradient_checkpointing(True)
    return model


def _fresh(cfg: TrainConfig, manifest: CacheManifest, teachers: tuple[str, ...], attn: str) -> DistillModel:
    llava = build_llava(cfg.vision_tower, cfg.llm, cfg.projector, attn_implementation=attn)
    add_mole(llava.vision_tower, cfg.mole, freeze_base=True)
    dim, tokens = student_geometry(llava)
    adapters = adapters_from_manifest(manifest, dim, tokens, cfg.adapter_kind, cfg.sam_layout)
    adapters = nn.ModuleDict({t: adapters[t] for t in teachers if t in adapters})
    return DistillModel(llava, adapters, teachers, manifest.cls_teacher, cfg.kd, cfg.mole)


def _from_previous_stage(cfg, manifest, teachers, attn) -> DistillModel:
    model = load_pretrained(cfg.init_from, attn_implementation=attn, kd=cfg.kd)
    dim, tokens = student_geometry(model.llava)
    expected = adapters_from_manifest(manifest, dim, tokens, cfg.adapter_kind, cfg.sam_layout)
    check_compatible(model, cfg, expected, teachers)
    model.adapters = nn.ModuleDict({t: model.adapters[t] for t in teachers if t in expected})
    model.teachers, model.clip_name = teachers, manifest.cls_teacher
    return model


def _from_released(cfg, manifest, teachers, attn) -> DistillModel:
    """A released MoVE-KD checkpoint as the starting student: its MoLE must match ``cfg.mole``,
    its adapters the cache's (``check_compatible``); adapters of teachers not in this run are dropped."""
    grids = {t.name: t.grid for t in manifest.teachers}
    model = load_released(
        cfg.init_from_released,
        vision_tower=cfg.vision_tower,
        attn_implementation=attn,
        mole=cfg.mole,
        kd=cfg.kd,
        sam_layout=cfg.sam_layout,
        grids=grids,
    )
    dim, tokens = student_geometry(model.llava)
    expected = adapters_from_manifest(manifest, dim, tokens, cfg.adapter_kind, cfg.sam_layout)
    check_compatible(model, cfg, expected, teachers, source=cfg.init_from_released)
    dropped = sorted(set(model.adapters) - set(teachers))
    if dropped:
        log.warning("init_from_released: adapters %s are not teachers of this run; not used", dropped)
    model.adapters = nn.ModuleDict({t: model.adapters[t] for t in teachers if t in expected})
    model.teachers, model.clip_name = teachers, manifest.cls_teacher
    return model


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen parameters in ``dtype`` (e.g. bf16 on GPU: the stage-1 LLM needs no fp32
    master copy). Returns how many tensors were cast. Not for FSDP (it wants uniform dtypes)."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
            n += 1
    return n
