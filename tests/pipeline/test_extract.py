"""Extraction without Ray: the worker writes shards whose features equal a direct teacher forward.

``ShardExtractor`` is the code every Ray actor runs; here it runs in-process so every registered
teacher family can be checked quickly. The Ray orchestration itself is tested in tests/e2e.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cache import CacheWriter, get_codec, open_cache, verify_cache
from cache.preprocess import null_image_tensor, preprocess_image
from pipeline.extract import _manifest
from pipeline.extract_config import ExtractConfig
from pipeline.extract_worker import ShardExtractor
from pipeline.teachers import build_teacher
from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers.datasets import corrupt_member, pack_crops


@pytest.fixture(scope="module")
def tiny_specs(tmp_path_factory):
    return {s.name: s for s in make_tiny_teachers(tmp_path_factory.mktemp("tiny"))}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_crops(str(tmp_path_factory.mktemp("data")), n=6, shard_size=4)


def extract_all(cfg: ExtractConfig, packed) -> ShardExtractor:
    worker = ShardExtractor(cfg)
    manifest = _manifest(cfg, packed, worker.describe())
    CacheWriter.create(cfg.out, manifest)
    for shard in range(packed.num_shards + 1):
        worker.process(shard, manifest.to_dict())
    return worker


def rel_mse(a, b):
    return float(((a - b) ** 2).sum() / max((b**2).sum(), 1e-30))


FAMILIES = ["eva", "convnext", "sam", "pix2struct", "dinov2", "siglip", "hf_vit", "timm_vit"]


@pytest.mark.parametrize("other", FAMILIES)
@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_cached_features_equal_a_direct_forward(tmp_path, tiny_specs, packed, other, codec):
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        codec=codec,
        batch_size=3,
        teachers=(tiny_specs["clip"], tiny_specs[other]),
        progress=False,
    )
    extract_all(cfg, packed)
    cache = open_cache(cfg.out)
    keys = packed.keys_in_shard(0) + packed.keys_in_shard(1)
    batch = cache.read(keys)
    images = {k: Image.open(io.BytesIO(b)) for s in range(packed.num_shards) for k, b, _ in packed.iter_shard(s)}
    for name in ("clip", other):
        teacher = build_teacher(tiny_specs[name])  # loaded independently of the worker
        pixels = np.stack([preprocess_image(images[k], teacher.preprocess_spec) for k in keys])
        out = teacher.encode(torch.from_numpy(pixels))
        bound = get_codec(codec).rel_mse_bound
        assert rel_mse(batch.features[name], out.tokens.numpy()) <= bound, name
        if name == "clip":  # the [CLS] state and attention row are stored exactly (float32)
            np.testing.assert_allclose(batch.cls_state, out.cls_state.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(batch.cls_attn, out.cls_attn.numpy(), rtol=1e-5, atol=1e-7)
    assert verify_cache(cfg.out, progress=False).ok


def test_no_image_row_holds_the_teachers_output_for_zero_input(tmp_path, tiny_specs, packed):
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        codec="fp16",
        teachers=(tiny_specs["clip"], tiny_specs["sam"]),
        progress=False,
    )
    extract_all(cfg, packed)
    got = open_cache(cfg.out).read(["__no_image__"])
    for name in ("clip", "sam"):
        teacher = build_teacher(tiny_specs[name])
        zero = torch.from_numpy(null_image_tensor(teacher.preprocess_spec)[None])
        assert rel_mse(got.features[name], teacher.encode(zero).tokens.numpy()) < 1e-6


def test_corrupt_image_is_recorded_and_its_row_invalid(tmp_path, tiny_specs):
    packed = pack_crops(str(tmp_path / "data"), n=5, shard_size=4)
    bad = corrupt_member(packed, 0)
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        teachers=(tiny_specs["clip"], tiny_specs["convnext"]),
        progress=False,
    )
    worker = ShardExtractor(cfg)
    manifest = _manifest(cfg, packed, worker.describe())
    CacheWriter.create(cfg.out, manifest)
    summary = worker.process(0, manifest.to_dict())
    assert list(summary["failed"]) == [bad] and "cannot decode image" in summary["failed"][bad]
    cache = open_cache(cfg.out)
    assert not cache.is_valid(bad) and "cannot decode" in cache.failed()[bad]
    good = [k for k in packed.keys_in_shard(0) if k != bad]
    assert all(cache.is_valid(k) for k in good) and len(cache.read(good).keys) == 3


def test_nonfinite_teacher_output_marks_the_image_failed(tmp_path, tiny_specs, packed, monkeypatch):
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        teachers=(tiny_specs["clip"], tiny_specs["dinov2"]),
        progress=False,
    )
    worker = ShardExtractor(cfg)
    manifest = _manifest(cfg, packed, worker.describe())
    CacheWriter.create(cfg.out, manifest)
    teacher = worker.teachers["dinov2"]
    real = teacher.encode

    def poisoned(pixels):
        out = real(pixels)
        out.tokens[0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(teacher, "encode", poisoned)
    summary = worker.process(0, manifest.to_dict())
    first = packed.keys_in_shard(0)[0]
    assert summary["failed"] == {first: "teacher dinov2 produced NaN/Inf"}
    assert verify_cache(cfg.out, sample=0, progress=False).problems == [
        f"shard {s:05d} (data shard): not committed (extraction incomplete)" for s in [1]
    ] + ["shard 00002 (reserved no-image row): not committed (extraction incomplete)"]


def test_config_errors_name_the_field(tiny_specs):
    base = dict(packed="p", out="o", teachers=[tiny_specs["clip"].to_dict()])
    with pytest.raises(ValueError, match="unknown extraction config key"):
        ExtractConfig.from_dict({**base, "batchsize": 3})
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        ExtractConfig.from_dict({**base, "codec": "int3"})
    with pytest.raises(ValueError, match="cls_teacher 'clip2'"):
        ExtractConfig.from_dict({**base, "cls_teacher": "clip2"})
    with pytest.raises(ValueError, match=r"missing \['out'\]"):
        ExtractConfig.from_dict({**base, "out": None})
    cfg = ExtractConfig.from_dict({**base, "aspect": "pad"})
    assert all(t.aspect == "pad" for t in cfg.teachers)
