"""Online-teacher mode: the original MoVE-KD way, kept for reference and comparison.

Instead of reading targets from the cache, the teachers of an extraction config run on every
batch, on the training device, and replace the batch's ``targets``, ``cls_state`` and
``cls_attn``. It wraps the collate function (so the trainer is unchanged) and therefore needs the
DataLoader to collate in the training process (``num_workers=0``): teachers are not copied into
worker processes. Images and the "no image" input go through exactly the preprocessing the
extraction would use (``cache.preprocess``), so with a lossless cache both modes see the same
targets; the equivalence test checks that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from cache.marker import NULL_KEY
from cache.preprocess import null_image_tensor, preprocess_image


class OnlineTargets:
    """``collate`` followed by a live teacher forward that fills the batch's targets."""

    def __init__(self, teachers: dict, images: Callable, collate: Callable, cls_teacher: str | None):
        self.teachers, self.images, self.collate, self.cls_teacher = teachers, images, collate, cls_teacher

    @classmethod
    def from_config(
        cls, extract_config: str, images: Callable, collate: Callable, device: str, names: tuple[str, ...]
    ) -> OnlineTargets:
        from jobs.config import load_config
        from pipeline.teachers import build_teacher

        cfg = load_config(extract_config, kind="extract")
        missing = sorted(set(names) - {t.name for t in cfg.teachers})
        if missing:
            raise ValueError(f"--online-teachers {extract_config}: no teacher(s) {missing} in that config")
        teachers = {s.name: build_teacher(s, device=device) for s in cfg.teachers if s.name in names}
        return cls(teachers, images, collate, cfg.cls_teacher)

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collate(samples)
        pictures = [None if k == NULL_KEY else self.images(k) for k in batch["keys"]]
        for name, teacher in self.teachers.items():
            spec = teacher.preprocess_spec
            pixels = np.stack([null_image_tensor(spec) if p is None else preprocess_image(p, spec) for p in pictures])
            out = teacher.encode(torch.from_numpy(pixels))
            # teachers run under inference_mode; clone so autograd may use the targets
            batch["targets"][name] = out.tokens.float().cpu().clone()
            if name == self.cls_teacher:
                batch["cls_state"], batch["cls_attn"] = (
                    out.cls_state.float().cpu().clone(),
                    out.cls_attn.float().cpu().clone(),
                )
        return batch


def online_config(cfg):
    """Online mode collates in the training process: force ``num_workers=0``."""
    return dataclasses.replace(cfg, num_workers=0) if cfg.num_workers else cfg
