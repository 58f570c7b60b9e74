"""Adapters built from cache TeacherEntry objects: shapes, formula, CLIP passthrough, errors."""

import pytest
import torch

from cache.manifest import CacheManifest, PreprocessSpec, TeacherEntry
from student.adapters import (
    MLPAdapter,
    TokenLinearAdapter,
    adapters_from_manifest,
    apply_adapters,
    build_adapters,
)

D, N = 8, 576  # small student width keeps the 4096 -> 576 token map cheap


def entry(name, grid, channels, resample="none", native_grid=None):
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
        preprocess=PreprocessSpec(resolution=336),
        codec="raw",
        resample=resample,
        native_grid=native_grid,
    )


CLIP = entry("clip", (24, 24), D)
EVA = entry("eva", (64, 64), 12)  # native 4096-token grid
CONVNEXT = entry("convnext", (32, 32), 6)
SAM_RESAMPLED = entry("sam", (24, 24), 4, resample="area", native_grid=(64, 64))
ALL = [CLIP, EVA, CONVNEXT, SAM_RESAMPLED]


def test_auto_adapters_from_entries_shapes():
    adapters = build_adapters(ALL, student_dim=D, student_tokens=N, exclude=("clip",))
    assert sorted(adapters) == ["convnext", "eva", "sam"]
    assert isinstance(adapters["eva"], TokenLinearAdapter) and isinstance(adapters["sam"], MLPAdapter)
    assert adapters["eva"].token_proj.weight.shape == (N, 4096)
    assert adapters["convnext"].token_proj.weight.shape == (N, 1024)
    for t in (EVA, CONVNEXT, SAM_RESAMPLED):
        out = adapters[t.name](torch.randn(2, t.tokens, t.channels))
        assert out.shape == (2, N, D)


def test_token_linear_formula():
    torch.manual_seed(0)
    a = TokenLinearAdapter(channels=5, tokens=7, student_dim=3, student_tokens=4)
    x = torch.randn(2, 7, 5)
    h = torch.nn.functional.gelu(x @ a.channel_proj.weight.T + a.channel_proj.bias)  # [B, N, D]
    want = torch.einsum("mn,bnd->bmd", a.token_proj.weight, h) + a.token_proj.bias[None, :, None]
    torch.testing.assert_close(a(x), want)
    assert a(x.to(torch.bfloat16)).dtype == torch.float32  # cached bf16 is cast to the adapter dtype


def test_mlp_adapter_formula_and_token_check():
    torch.manual_seed(0)
    a = MLPAdapter(channels=5, tokens=4, student_dim=3, student_tokens=4)
    x = torch.randn(2, 4, 5)
    want = a.fc2(torch.nn.functional.gelu(a.fc1(x)))
    torch.testing.assert_close(a(x), want)
    with pytest.raises(ValueError, match="tokens=4096 != student_tokens=576"):
        MLPAdapter(channels=5, tokens=4096, student_dim=3, student_tokens=576)


def test_clip_teacher_gets_no_adapter_and_must_match():
    adapters = build_adapters([CLIP, EVA], D, N, exclude=["clip"])
    assert "clip" not in adapters
    with pytest.raises(ValueError, match="used without an adapter"):
        build_adapters([entry("clip", (24, 24), D + 1), EVA], D, N, exclude=["clip"])
    with pytest.raises(ValueError, match="used without an adapter"):
        build_adapters([entry("clip", (16, 16), D)], D, N, exclude=["clip"])
    with pytest.raises(ValueError, match="not teachers"):
        build_adapters([EVA], D, N, exclude=["clip"])


def test_explicit_kinds():
    adapters = build_adapters([SAM_RESAMPLED], D, N, kind="token_linear")
    assert isinstance(adapters["sam"], TokenLinearAdapter)
    with pytest.raises(ValueError, match="student_tokens"):
        build_adapters([EVA], D, N, kind="mlp")
    with pytest.raises(ValueError, match="adapter kind"):
        build_adapters([EVA], D, N, kind="bilinear")


def test_from_manifest_and_apply():
    manifest = CacheManifest(
        teachers=tuple(ALL), num_shards=1, shard_size=4, dataset_fingerprint="x", cls_teacher="clip"
    )
    adapters = adapters_from_manifest(manifest, student_dim=D, student_tokens=N)
    feats = {t.name: torch.randn(2, t.tokens, t.channels) for t in ALL}
    out = apply_adapters(adapters, feats)
    assert out["clip"] is feats["clip"]
    assert all(v.shape == (2, N, D) for v in out.values())
    with pytest.raises(ValueError, match="no cached features"):
        apply_adapters(adapters, {"clip": feats["clip"]})


def test_bad_input_shape():
    a = TokenLinearAdapter(channels=5, tokens=7, student_dim=3, student_tokens=4)
    with pytest.raises(ValueError, match=r"\[batch, 7, 5\]"):
        a(torch.randn(2, 6, 5))
