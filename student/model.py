"""The distillation model: LLaVA student (MoLE CLIP -> projector -> LLM) plus teacher adapters.

``build_student(cfg, manifest)`` assembles it; ``DistillModel.forward(batch)`` returns every loss
part as a dict (``loss``, ``loss/text``, ``loss/balance``, ``loss/kd``, ``kd/<teacher>``,
``weight/<teacher>``...). ``set_trainable`` (``student.trainable``) picks the stage's parameters;
``export_pretrained``/``load_pretrained`` (``student.export``) save and load a trained student.

Decisions:
- The KD target of the student is ``LlavaStudent``'s patch tokens (``hidden_states[-2][:, 1:]``,
  the projector's input), compared with the cached teacher tokens after the adapters; token and
  teacher weights use the CLIP teacher's cached ``cls_attn``/``cls_state`` from the batch.
- Teachers: the config's list (default every teacher in the cache, in manifest order); the
  cache's ``cls_teacher`` is the KD's "CLIP" (raw targets, fixed 0.8 weight in the released rule).
  A cache without a ``cls_teacher`` only works with uniform token and fixed teacher weights.
- The balance loss is always computed when the tower has MoLE layers (its weight may be 0): the
  graph then connects every router, which ``student.trainable``'s liveness rule relies on.
- Building is seeded (``torch.random.fork_rng`` + ``cfg.seed``): every rank and every rebuild
  gets the same fresh MoLE/projector/adapter init, and the caller's RNG is left untouched.
- The model builder picks ``attn_implementation``: flash-attention-2 when installed, on CUDA,
  with bf16; else SDPA (``student.llava.default_attn_implementation``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cache.manifest import CacheManifest
from student.adapters import adapters_from_manifest, apply_adapters
from student.config import TrainConfig
from student.kd_loss import KDConfig, kd_loss, total_loss
from student.llava import LlavaStudent, build_llava, default_attn_implementation
from student.mole import MoLEConfig, add_mole, mole_balance_loss, mole_modules, mole_routing_stats
from student.trainable import parameter_categories, set_trainable  # noqa: F401  (re-exported API)


class DistillModel(nn.Module):
    """``LlavaStudent`` with MoLE in its tower, plus one adapter per non-CLIP teacher."""

    def __init__(
        self,
        llava: LlavaStudent,
        adapters: nn.ModuleDict,
        teachers: tuple[str, ...],
        clip_name: str | None,
        kd: KDConfig = KDConfig(),
        mole: MoLEConfig = MoLEConfig(),
    ) -> None:
        super().__init__()
        missing = sorted(t for t in teachers if t != clip_name and t not in adapters)
        if missing:
            raise ValueError(f"teachers {missing} have no adapter (adapters: {sorted(adapters)})")
        self.llava, self.adapters = llava, adapters
        self.teachers, self.clip_name = tuple(teachers), clip_name
        self.kd_config, self.mole_config = kd, mole

    @property
    def vision_tower(self) -> nn.Module:
        return self.llava.vision_tower

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Every loss part of one batch (see ``student.kd_loss.total_loss``)."""
        pixels = batch.get("pixel_values")
        if pixels is None or batch.get("labels") is None:
            raise ValueError("a distillation batch needs 'pixel_values' and 'labels' (text-only rows: zero pixels)")
        out = self.llava(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            attention_mask=batch.get("attention_mask"),
            pixel_values=pixels,
            has_image=batch.get("has_image"),
        )
        balance = mole_balance_loss(self.vision_tower) if mole_modules(self.vision_tower) else None
        kd_out = None
        if self.teachers:
            kd_out = kd_loss(
                out["patch_tokens"],
                self.adapted_targets(batch),
                batch.get("cls_attn"),
                batch.get("cls_state"),
                self.kd_config,
                self.clip_name,
            )
        return total_loss(out["loss"], balance, kd_out, self.kd_config, self.mole_config.balance_weight)

    def adapted_targets(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        targets = batch.get("targets")
        if not isinstance(targets, Mapping):
            raise ValueError("the batch has no 'targets' dict {teacher: [B, N, C]}")
        missing = sorted(set(self.teachers) - set(targets))
        if missing:
            raise ValueError(f"the batch lacks cached features of teacher(s) {missing} (has {sorted(targets)})")
        return apply_adapters(self.adapters, {t: targets[t] for t in self.teachers})

    def routing_stats(self) -> dict[str, float]:
        """Per-layer expert fractions of the latest forward (empty without MoLE)."""
        return mole_routing_stats(self.vision_tower) if mole_modules(self.vision_tower) else {}


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
    With ``cfg.init_from`` the student starts from a previous stage's ``export_pretrained`` dir.
    """
    teachers = resolve_teachers(cfg, manifest)
    _check_cls_needs(cfg.kd, manifest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            model = _from_previous_stage(cfg, manifest, teachers, _attn(cfg, compute_dtype))
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
    adapters = adapters_from_manifest(manifest, dim, tokens, cfg.adapter_kind)
    adapters = nn.ModuleDict({t: adapters[t] for t in teachers if t in adapters})
    return DistillModel(llava, adapters, teachers, manifest.cls_teacher, cfg.kd, cfg.mole)


def _from_previous_stage(cfg, manifest, teachers, attn) -> DistillModel:
    from student.export import check_compatible, load_pretrained

    model = load_pretrained(cfg.init_from, attn_implementation=attn, kd=cfg.kd)
    dim, tokens = student_geometry(model.llava)
    expected = adapters_from_manifest(manifest, dim, tokens, cfg.adapter_kind)
    check_compatible(model, cfg, expected, teachers)
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


def export_pretrained(model: DistillModel, out_dir, tokenizer=None):
    """See ``student.export.export_pretrained``."""
    from student.export import export_pretrained as _export

    return _export(model, out_dir, tokenizer)


def load_pretrained(path, torch_dtype=None, attn_implementation=None, kd=None) -> DistillModel:
    """See ``student.export.load_pretrained``."""
    from student.export import load_pretrained as _load

    return _load(path, torch_dtype, attn_implementation, kd)
