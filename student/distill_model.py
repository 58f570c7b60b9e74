"""``DistillModel``: the LLaVA student (MoLE CLIP -> projector -> LLM) plus one adapter per teacher.

``DistillModel.forward(batch)`` returns every loss part as a dict (``loss``, ``loss/text``,
``loss/balance``, ``loss/kd``, ``kd/<teacher>``, ``weight/<teacher>``...). It is built by
``student.model.build_student`` (from a config and a cache manifest) or loaded by
``student.export.load_pretrained``; both import this module, which imports neither of them.

Decisions:
- The KD target of the student is ``LlavaStudent``'s patch tokens (``hidden_states[-2][:, 1:]``,
  the projector's input), compared with the cached teacher tokens after the adapters; token and
  teacher weights use the CLIP teacher's cached ``cls_attn``/``cls_state`` from the batch.
- The balance loss is always computed when the tower has MoLE layers (its weight may be 0): the
  graph then connects every router, which ``student.trainable``'s liveness rule relies on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from student.adapters import apply_adapters
from student.kd_loss import KDConfig, kd_loss, total_loss
from student.llava import LlavaStudent
from student.mole import MoLEConfig, mole_balance_loss, mole_modules, mole_routing_stats


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
            if "encoded_targets" in batch:
                raise ValueError(
                    "the batch holds encoded_targets (target_decode: device): dequantise them first with "
                    "student.target_decode.decode_batch_targets, as the train loop does"
                )
            raise ValueError("the batch has no 'targets' dict {teacher: [B, N, C]}")
        missing = sorted(set(self.teachers) - set(targets))
        if missing:
            raise ValueError(f"the batch lacks cached features of teacher(s) {missing} (has {sorted(targets)})")
        return apply_adapters(self.adapters, {t: targets[t] for t in self.teachers})

    def routing_stats(self) -> dict[str, float]:
        """Per-layer expert fractions of the latest forward (empty without MoLE)."""
        return mole_routing_stats(self.vision_tower) if mole_modules(self.vision_tower) else {}
