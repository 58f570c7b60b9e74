"""``TrainConfig``: every knob of a student training run, as one frozen dataclass.

Decisions:
- The dataclass defaults ARE the stage-1 (pretrain) recipe of docs/method.md §7 (LLaVA-1.5 /
  released MoVE-KD scripts), written only here. The stage-2 recipe is written only in the preset
  ``jobs/configs/train_v1_0_finetune.yaml`` (``jobs.config.load_config``). A variant changes a
  field with ``dataclasses.replace`` or a ``--set`` override. There are no
  "None means stage default" fields: the stored config always holds the concrete values used,
  so a checkpoint's config says exactly what ran.
- ``tune_vision_base``: what happens to the base CLIP weights in stage 2. The released finetune
  script passes ``--tune_all True`` and ``train.py`` then calls ``model.requires_grad_(True)``
  (the tower's ``@torch.no_grad`` is commented out), so the base CLIP weights ARE trained in
  stage 2, next to MoLE, projector, adapters and the LLM. The stage-2 preset sets it True;
  set it False for LLaVA-1.5's frozen tower. Stage 1 never tunes them.
- ``sam_layout``: ``released`` (default) feeds SAM's cached row-major tokens to its adapter in the
  released code's flatten/pixel_unshuffle layout (student/adapters.py); ``honest`` as cached.
- ``bf16=None`` means "bf16 autocast on CUDA, fp32 on CPU"; trainable weights stay fp32 masters.
- ``init_from_released``: start from a released MoVE-KD checkpoint folder (``student.released``);
  its CLIP config comes from ``vision_tower``, its tokenizer is the default ``tokenizer``.
- ``target_decode``: where cached targets are dequantised. ``host``: in the DataLoader (workers),
  float32 through collate, pinning and the copy, as before. ``device``: the stored components
  (int8 + scales, bf16 bits, ...) travel instead, 4x fewer bytes, and ``student.target_decode``
  dequantises them on the training device, bit-identical to the host decode (tested), so the
  choice is not part of a checkpoint's fingerprint. ``auto`` (default): ``device`` on CUDA,
  ``host`` on CPU, where the decode would move from parallel workers into the training process
  and there is no copy to save (measured in BENCHMARKS.md, loading).
- ``cache``: one path, or a list of caches of one pack joined by image key (``cache.multi``; each
  teacher from the first cache that holds it), so v1.1 = the v1.0 cache + a SAM-only extraction.
  The paths are not in a checkpoint's fingerprint (the teachers are): moving caches is fine.
- Paths are plain strings (JSON-friendly); nothing here touches the filesystem.
- ``to_dict``/``from_dict`` round-trip through JSON; unknown keys (also nested in ``mole``/``kd``)
  raise ``ValueError`` naming them (``cache.strict``), so a typo in a YAML preset fails loudly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cache.strict import from_mapping
from student.kd_loss import KDConfig
from student.mole import MoLEConfig

STAGES = ("pretrain", "finetune")
TEMPLATES = ("plain", "vicuna_v1")
ASPECTS = ("square", "pad")
SCHEDULES = ("cosine",)
STRATEGIES = ("ddp", "fsdp")
ADAPTER_KINDS = ("auto", "token_linear", "mlp")
SAM_LAYOUTS = ("released", "honest")
TARGET_DECODES = ("auto", "host", "device")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are stage 1 (pretrain) of MoVE-KD / LLaVA-1.5."""

    stage: str = "pretrain"
    # -- paths -----------------------------------------------------------------------------
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    llm: str = "lmsys/vicuna-7b-v1.5"
    tokenizer: str = ""  # "" = the LLM's folder
    cache: str | tuple[str, ...] = ""  # the teacher feature cache (zarr root), or several of one pack
    image_root: str = ""  # packed image dir or image folder
    data_json: str = ""  # LLaVA-format conversations
    output_dir: str = "runs/movekd"
    init_from: str = ""  # a previous stage's export_pretrained dir ("" = start from vision_tower/llm)
    init_from_released: str = ""  # a released MoVE-KD checkpoint folder (student.released.load_released)
    # -- model / data ----------------------------------------------------------------------
    teachers: tuple[str, ...] | None = None  # None = every teacher in the cache
    template: str = "plain"
    image_aspect_ratio: str = "square"
    image_alpha: str = "drop"  # "drop" as convert('RGB') (released), "white": composite (must match the cache)
    max_length: int = 2048
    projector: str = "mlp2x_gelu"
    adapter_kind: str = "auto"
    sam_layout: str = "released"  # SAM tokens as the released code lays them out, or "honest" (row-major)
    mole: MoLEConfig = field(default_factory=MoLEConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    tune_vision_base: bool = False
    attn_implementation: str = ""  # "" = flash_attention_2 when usable, else sdpa
    # -- optimisation ----------------------------------------------------------------------
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    epochs: int = 1
    batch_size: int = 16  # per device
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # HF Trainer's default, which LLaVA's scripts keep
    max_steps: int | None = None  # cap on optimizer steps (None = epochs decide)
    seed: int = 42
    bf16: bool | None = None  # None = on iff CUDA
    gradient_checkpointing: bool = True
    group_by_modality_length: bool = False
    num_workers: int = 4
    target_decode: str = "auto"  # where targets are dequantised: auto (device on CUDA, else host), host, device
    # -- bookkeeping -----------------------------------------------------------------------
    log_every: int = 1
    save_every: int = 1000
    keep_last_k: int = 2
    distributed: str = "ddp"
    find_unused_parameters: bool = False
    plot: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.cache, (list, tuple)):
            caches = tuple(self.cache)
            if not caches or not all(isinstance(c, str) and c for c in caches) or len(set(caches)) != len(caches):
                raise ValueError(f"TrainConfig.cache must be a path or a list of distinct paths, got {list(caches)}")
            object.__setattr__(self, "cache", caches[0] if len(caches) == 1 else caches)
        elif not isinstance(self.cache, str):
            raise ValueError(f"TrainConfig.cache must be a path or a list of paths, got {self.cache!r}")
        if self.teachers is not None:
            object.__setattr__(self, "teachers", tuple(str(t) for t in self.teachers))
            if not self.teachers or len(set(self.teachers)) != len(self.teachers):
                raise ValueError(f"TrainConfig.teachers must be non-empty and unique, got {self.teachers}")
        for name, value, allowed in (
            ("stage", self.stage, STAGES),
            ("template", self.template, TEMPLATES),
            ("image_aspect_ratio", self.image_aspect_ratio, ASPECTS),
            ("image_alpha", self.image_alpha, ("drop", "white")),
            ("schedule", self.schedule, SCHEDULES),
            ("distributed", self.distributed, STRATEGIES),
            ("adapter_kind", self.adapter_kind, ADAPTER_KINDS),
            ("sam_layout", self.sam_layout, SAM_LAYOUTS),
            ("target_decode", self.target_decode, TARGET_DECODES),
        ):
            if value not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {value!r}")
        self._check_numbers()
        if self.init_from and self.init_from_released:
            raise ValueError("TrainConfig.init_from and init_from_released are exclusive: start from one checkpoint")
        if self.stage == "pretrain" and self.tune_vision_base:
            raise ValueError(
                "TrainConfig.tune_vision_base=True is a stage-2 (finetune) option; "
                "stage 1 trains projector, MoLE and adapters only"
            )

    def _check_numbers(self) -> None:
        positive = ("max_length", "epochs", "batch_size", "grad_accum", "log_every", "save_every", "keep_last_k")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.num_workers < 0:
            raise ValueError("TrainConfig.weight_decay and num_workers must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"TrainConfig.max_steps must be >= 1 or None, got {self.max_steps}")

    def decode_targets_on_device(self, device) -> bool:
        """Whether the DataLoader hands over stored components for ``device`` to dequantise."""
        if self.target_decode == "auto":
            return str(device).startswith("cuda")
        return self.target_decode == "device"

    @property
    def tokenizer_path(self) -> str:
        """``tokenizer``, else the released checkpoint (LLaVA saves its tokenizer there), else the LLM."""
        return self.tokenizer or self.init_from_released or self.llm

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["mole"], d["kd"] = self.mole.to_dict(), self.kd.to_dict()
        d["teachers"] = list(self.teachers) if self.teachers is not None else None
        d["cache"] = list(self.cache) if isinstance(self.cache, tuple) else self.cache
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return from_mapping(cls, d)
