"""Inputs of ``bench_loading.py``: a cache at the real MoVE-KD v1.0 shapes, and the tiny trainer.

- ``write_v1_cache``: a cache whose manifest has the v1.0 teachers at their real token grids and
  channels (docs/method.md §2: clip 24x24 x 1024 with [CLS] state and attention, eva 64x64 x
  1024, convnext 32x32 x 3072), int8 codec, written through ``CacheWriter.write_encoded`` (the
  extraction worker's path) one shard at a time. Values are synthetic: N(0, 1) tokens, a
  Gaussian [CLS] state and a softmax attention row, from a seeded generator, one image at a time,
  so a shard never exists as float32. Per-token absmax int8 of Gaussian tokens has about the same
  level entropy as int8 of real ViT tokens, so zstd leaves a similar number of bytes to read.
- ``build_tiny_training``: the ``train_tiny`` preset's trainer (``jobs.train.build_training``) on
  a cache of the ``tiny`` extraction preset's teachers, extracted in-process from the same pack.
"""

from __future__ import annotations

import os

import numpy as np

from cache import CacheManifest, CacheWriter, PreprocessSpec, TeacherEntry, get_codec

V1_TEACHERS = {  # name: (grid, channels, input px)
    "clip": ((24, 24), 1024, 336),
    "eva": ((64, 64), 1024, 1024),
    "convnext": ((32, 32), 3072, 1024),
}


def v1_manifest(packed, codec: str = "int8") -> CacheManifest:
    teachers = tuple(
        TeacherEntry(
            name=name,
            family=name,
            source="synthetic N(0,1)",
            weights_fingerprint="bench:synthetic",
            layer="synthetic",
            tokens=grid[0] * grid[1],
            grid=grid,
            channels=channels,
            compute_dtype="bfloat16",
            preprocess=PreprocessSpec(resolution=px),
            codec=codec,
            has_cls=name == "clip",
        )
        for name, (grid, channels, px) in V1_TEACHERS.items()
    )
    return CacheManifest(
        teachers=teachers,
        num_shards=packed.num_shards,
        shard_size=packed.shard_size,
        dataset_fingerprint=packed.fingerprint,
        dataset_name="bench-photos",
        cls_teacher="clip",
    )


def _synthetic_rows(manifest: CacheManifest, n: int, rng: np.random.Generator):
    """Encoded features of ``n`` synthetic images, plus cls state and attention."""
    parts: dict[str, dict[str, list]] = {t.name: {} for t in manifest.teachers}
    cls_state, cls_attn = [], []
    for _ in range(n):
        for t in manifest.teachers:
            x = rng.standard_normal((1, t.tokens, t.channels), dtype=np.float32)
            for comp, arr in get_codec(t.codec).encode(x).items():
                parts[t.name].setdefault(comp, []).append(arr)
        cls = manifest.teacher(manifest.cls_teacher)
        cls_state.append(rng.standard_normal(cls.channels, dtype=np.float32))
        logits = rng.standard_normal(cls.tokens + 1) * 2.0
        p = np.exp(logits - logits.max())
        cls_attn.append((p / p.sum())[1:].astype(np.float32))
    encoded = {t: {c: np.concatenate(v) for c, v in comps.items()} for t, comps in parts.items()}
    return encoded, np.stack(cls_state), np.stack(cls_attn)


def write_v1_cache(out: str, packed, codec: str = "int8", seed: int = 0) -> CacheManifest:
    """Write every shard of ``packed`` (and the no-image row) with synthetic v1.0-shaped features."""
    manifest = v1_manifest(packed, codec)
    writer = CacheWriter.create(out, manifest)
    rng = np.random.default_rng(seed)
    for shard in range(packed.num_shards + 1):
        keys = packed.keys_in_shard(shard) if shard < packed.num_shards else ["__no_image__"]
        encoded, cls_state, cls_attn = _synthetic_rows(manifest, len(keys), rng)
        writer.write_encoded(shard, keys, encoded, cls_state, cls_attn)
    return manifest


def stored_bytes(root: str) -> int:
    """Bytes of every array's chunk/shard files under ``root`` (what a reader pulls from storage)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        if "c" in os.path.relpath(dirpath, root).split(os.sep):  # zarr v3 chunk keys: <array>/c/...
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def extract_tiny_cache(work: str, packed) -> str:
    """The ``tiny`` extraction preset's teachers, run in-process over ``packed``; returns the cache dir."""
    from jobs.config import load_config
    from pipeline.extract import extract_in_process

    out = os.path.join(work, "tiny-cache")
    overrides = {
        "packed": packed.root,
        "out": out,
        "progress": False,
        "tiny_teachers.dir": os.path.join(work, "tiny-teachers"),
    }
    report = extract_in_process(load_config("tiny", overrides))
    if not report.ok:
        raise RuntimeError(f"extraction into {out} failed: {report.shards_failed}")
    return out


def build_tiny_training(work: str, packed, data_json: str):
    """``jobs.train.build_training`` for the ``train_tiny`` preset on a tiny-teacher cache."""
    from jobs.config import load_config
    from jobs.train import Dist, build_training

    cache = extract_tiny_cache(work, packed)
    cfg = load_config(
        "train_tiny",
        {
            "cache": cache,
            "image_root": packed.root,
            "data_json": data_json,
            "progress_bar": False,
            "output_dir": os.path.join(work, "train"),
            "tiny_student.dir": os.path.join(work, "tiny-student"),
        },
    )
    trainer, tokenizer = build_training(cfg, Dist())
    return cfg, trainer, tokenizer
