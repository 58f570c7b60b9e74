"""Shared pieces for the trainer/checkpoint/DDP tests: tiny models, a random in-memory dataset
with the ``student.data`` batch contract, the project's sampler (and a fixed-order subclass), and a child-process entry.

The dataset mirrors ``DistillDataset``'s sample dict (``input_ids``, ``labels``, ``pixel_values``,
``has_image``, ``targets`` {teacher: [N, C]}, ``cls_state`` [C], ``cls_attn`` [N], ``key``) so the
tests do not depend on the cache reader. Every row supervises exactly ``ANSWER`` tokens, so
per-rank mean text losses average to the global one (DDP == single process).

Run as ``python -m tests.student._trainer_fixtures SPEC.json`` to resume a run in a new process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from cache.manifest import CacheManifest, PreprocessSpec, TeacherEntry
from student.config import TrainConfig
from student.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from student.llava import collate
from student.mole import MoLEConfig
from student.sampler import DistributedLengthGroupedSampler

VISION_DIM, TOKENS, PAD_ID, ANSWER = 32, 16, 3, 6  # tiny CLIP: 56 px / 14 px = 4x4 patches


def entry(name: str, grid: tuple[int, int], channels: int) -> TeacherEntry:
    return TeacherEntry(
        name=name,
        family=name,
        source=f"test/{name}",
        weights_fingerprint="0",
        layer="-2",
        tokens=grid[0] * grid[1],
        grid=grid,
        channels=channels,
        compute_dtype="float32",
        preprocess=PreprocessSpec(resolution=56),
        codec="raw",
    )


def tiny_manifest(teachers=("clip", "eva", "convnext")) -> CacheManifest:
    all_entries = {
        "clip": entry("clip", (4, 4), VISION_DIM),
        "eva": entry("eva", (8, 8), 12),
        "convnext": entry("convnext", (4, 4), 24),
    }
    return CacheManifest(
        teachers=tuple(all_entries[t] for t in teachers),
        num_shards=1,
        shard_size=64,
        dataset_fingerprint="test",
        cls_teacher="clip",
        created="2025-01-01T00:00:00+00:00",
        package_version="test",
    )


class RandomDistillDataset(Dataset):
    """``n`` deterministic random rows (row i depends only on (seed, i mod distinct))."""

    def __init__(
        self, n: int, manifest: CacheManifest, seed: int = 0, distinct: int | None = None, text_only_every: int = 4
    ) -> None:
        self.n, self.manifest, self.seed = n, manifest, seed
        self.distinct, self.text_only_every = distinct or n, text_only_every

    def __len__(self) -> int:
        return self.n

    def modalities(self) -> list[bool]:
        return [(i % self.distinct) % self.text_only_every != self.text_only_every - 1 for i in range(self.n)]

    def lengths(self) -> list[int]:  # what student.data reports: spliced length, + image tokens
        return [5 + ANSWER + (TOKENS - 1 if image else 1) for image in self.modalities()]

    def __getitem__(self, i: int) -> dict:
        j = i % self.distinct
        g = torch.Generator().manual_seed(self.seed * 100_003 + j)
        image = (j % self.text_only_every) != self.text_only_every - 1
        question, answer = torch.randint(4, 200, (3,), generator=g), torch.randint(4, 200, (ANSWER,), generator=g)
        head = torch.tensor([1, IMAGE_TOKEN_INDEX]) if image else torch.tensor([1, 4])
        ids = torch.cat([head, question, answer])
        labels = torch.cat([torch.full((ids.numel() - ANSWER,), IGNORE_INDEX), answer])
        pixels = torch.randn(3, 56, 56, generator=g) if image else torch.zeros(3, 56, 56)
        targets = {t.name: torch.randn(t.tokens, t.channels, generator=g) for t in self.manifest.teachers}
        return {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": pixels,
            "has_image": torch.tensor(image),
            "targets": targets,
            "cls_state": torch.randn(VISION_DIM, generator=g),
            "cls_attn": torch.rand(TOKENS, generator=g) / TOKENS,
            "key": f"row{j}",
        }


def collate_fn(samples: list[dict]) -> dict:
    batch = collate(samples, pad_token_id=PAD_ID)
    batch["targets"] = {t: torch.stack([s["targets"][t] for s in samples]) for t in samples[0]["targets"]}
    batch["cls_state"] = torch.stack([s["cls_state"] for s in samples])
    batch["cls_attn"] = torch.stack([s["cls_attn"] for s in samples])
    batch["key"] = [s["key"] for s in samples]
    return batch


class FixedOrderSampler(DistributedLengthGroupedSampler):
    """The project's sampler (same cursor protocol, sharding and resume checks) with the identity
    as its global order, for tests that need row i in position i (e.g. one fixed batch)."""

    def global_order(self, epoch: int) -> list[int]:
        return list(range(len(self.lengths)))


def make_sampler(kind: str, dataset, batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
    """``student.sampler.DistributedLengthGroupedSampler`` with grouping ``kind`` (``"none"``,
    ``"length"``, ``"modality_length"``), or ``"fixed"``: ``FixedOrderSampler``."""
    cls = FixedOrderSampler if kind == "fixed" else DistributedLengthGroupedSampler
    grouping = "none" if kind == "fixed" else kind
    return cls.from_dataset(dataset, batch, grouping=grouping, rank=rank, world_size=world_size, seed=seed)


def tiny_config(parts, out_dir, **overrides) -> TrainConfig:
    base = dict(
        vision_tower=str(parts.vision),
        llm=str(parts.llm),
        tokenizer=str(parts.tokenizer),
        output_dir=str(out_dir),
        batch_size=4,
        lr=5e-3,
        warmup_ratio=0.1,
        num_workers=0,
        progress_bar=False,
        save_every=1000,
        gradient_checkpointing=False,
        mole=MoLEConfig(rank=4),
        bf16=False,
    )
    base.update(overrides)
    if base.get("stage") == "finetune":  # the stage-2 recipe, from its one source (the preset)
        from jobs.config import load_config

        recipe = load_config("train_v1_0_finetune")
        keep = ("template", "image_aspect_ratio", "group_by_modality_length", "tune_vision_base")
        base = {**{k: getattr(recipe, k) for k in keep}, **base}
    return TrainConfig.from_dict(base)


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def run_from_spec(spec: dict) -> None:
    """Build everything from scratch (as a new process would), train, dump the final weights."""
    from student.model import build_student
    from student.trainer import Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(spec["config"])
    manifest = tiny_manifest(tuple(spec["teachers"]))
    model = build_student(cfg, manifest)
    dataset = RandomDistillDataset(spec["n"], manifest, seed=spec["data_seed"])
    sampler = make_sampler(spec.get("sampler", "none"), dataset, cfg.batch_size, seed=spec["data_seed"])
    Trainer(cfg, model, dataset, collate_fn, sampler).train(resume=spec["resume"], stop_after=spec.get("stop_after"))
    save_file(full_state(model), spec["dump"])


def ddp_worker(rank: int, world_size: int, port: int, spec: dict) -> None:
    """``torch.multiprocessing.spawn`` target: one gloo rank of a DDP/FSDP run."""
    import os

    import torch.distributed as dist

    from student.model import build_student
    from student.trainer import Trainer

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)  # test harness = jobs layer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = TrainConfig.from_dict(spec["config"])
        manifest = tiny_manifest(tuple(spec["teachers"]))
        dataset = RandomDistillDataset(spec["n"], manifest, seed=spec["data_seed"])
        for stop_after, resume in spec.get("phases", [[None, False]]):  # [[2, False], [None, True]]: cut, resume
            model = build_student(cfg, manifest)  # everything fresh per phase
            sampler = make_sampler(
                spec.get("sampler", "none"), dataset, cfg.batch_size, rank, world_size, spec["data_seed"]
            )
            trainer = Trainer(cfg, model, dataset, collate_fn, sampler, rank=rank, world_size=world_size)
            trainer.train(resume=resume, stop_after=stop_after)
        from student.checkpoint import gather_weights

        weights = gather_weights(model)  # collective under FSDP
        if rank == 0:
            save_file(weights, spec["dump"])
        dist.barrier()  # no rank tears gloo down while a peer still has work in flight
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_from_spec(json.loads(Path(sys.argv[1]).read_text()))
