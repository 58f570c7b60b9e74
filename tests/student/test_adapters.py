"""Adapters built from cache TeacherEntry objects: shapes, formula, CLIP passthrough, errors, and SAM's
released layout against an index formula and the released op sequence written out here."""

import numpy as np
import pytest
import torch

from cache.manifest import CacheManifest, PreprocessSpec, TeacherEntry
from student.adapters import (
    MLPAdapter,
    TokenLinearAdapter,
    adapters_from_manifest,
    apply_adapters,
    build_adapters,
    released_sam_layout,
)

D, N = 8, 576  # small student width keeps the 4096 -> 576 token map cheap


def entry(name, grid, channels, resample="none", native_grid=None, family=None):
    return TeacherEntry(
        name=name,
        family=family or name,
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
    adapters = build_adapters(ALL, student_dim=D, student_tokens=N, exclude=("clip",), sam_layout="honest")
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
    adapters = build_adapters([SAM_RESAMPLED], D, N, kind="token_linear", sam_layout="honest")
    assert isinstance(adapters["sam"], TokenLinearAdapter)
    with pytest.raises(ValueError, match="student_tokens"):
        build_adapters([EVA], D, N, kind="mlp")
    with pytest.raises(ValueError, match="adapter kind"):
        build_adapters([EVA], D, N, kind="bilinear")


def test_from_manifest_and_apply():
    manifest = CacheManifest(
        teachers=tuple(ALL), num_shards=1, shard_size=4, dataset_fingerprint="x", cls_teacher="clip"
    )
    adapters = adapters_from_manifest(manifest, student_dim=D, student_tokens=N, sam_layout="honest")
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


# -- SAM: the released layout ------------------------------------------------------------------
def released_index(c: int, h: int, w: int) -> np.ndarray:
    """For each (token, channel) of the released adapter input, the flat index into the neck
    ``[C, H, W]`` it holds, derived by hand from the op sequence (no torch reshapes):
    flatten(1, 2): f[k, x] = neck[k // H, k % H, x] for k < C*H;  reshape as a side x side image
    with W channels: img[x, i, j] = f[i*side + j, x];  pixel_unshuffle(2):
    u[x*4 + di*2 + dj, p, q] = img[x, 2p + di, 2q + dj];  view + permute: T[p*(side/2) + q, ch] = u[ch, p, q].
    """
    side = int(round((c * h) ** 0.5))
    half = side // 2
    out = np.empty((half * half, 4 * w), dtype=np.int64)
    for p in range(half):
        for q in range(half):
            for x in range(w):
                for di in range(2):
                    for dj in range(2):
                        k = (2 * p + di) * side + (2 * q + dj)
                        out[p * half + q, x * 4 + di * 2 + dj] = k * w + x  # f[k, x] is neck.flat[k*W + x]
    return out


@pytest.mark.parametrize("c,grid", [(16, (4, 4)), (32, (8, 8)), (8, (2, 4))])
def test_released_sam_layout_equals_the_hand_derived_index(c, grid):
    h, w = grid
    neck = torch.randn(2, c, h, w)
    cached = neck.flatten(2).transpose(1, 2)  # the cache: row-major tokens [B, H*W, C]
    got = released_sam_layout(cached, grid)
    want = neck.reshape(2, -1)[:, torch.from_numpy(released_index(c, h, w))]
    assert torch.equal(got, want)


def released_sam_adapter(neck, adapter_1, adapter_2):
    """The released code's SAM path, op for op (sam_encoder.py forward with add_pixel_shuffle,
    then move_llava_llama.py's view/permute and sam_adapter_1/2)."""
    f = neck.flatten(start_dim=1, end_dim=2)
    b, n, c = f.shape
    hw = int(n**0.5)
    f = torch.nn.functional.pixel_unshuffle(f.transpose(1, 2).reshape(b, c, hw, hw), 2)
    token = f.view(f.size(0), f.size(1), -1).permute(0, 2, 1)
    return adapter_2(torch.nn.functional.gelu(adapter_1(token).permute(0, 2, 1))).permute(0, 2, 1)


@pytest.mark.parametrize("c,grid", [(16, (4, 4)), (256, (64, 64))])  # a tiny one and SAM-L's neck
def test_released_layout_reproduces_the_released_sam_adapter(c, grid):
    torch.manual_seed(0)
    sam = entry("sam_v11", grid, c, family="sam")
    ours = build_adapters([sam], D, 4)["sam_v11"]  # sam_layout="released" is the default
    assert ours.layout == "released_sam"
    tokens, chans = (4096, 256) if c == 256 else (16, 16)
    assert ours.channel_proj.weight.shape == (D, chans) and ours.token_proj.weight.shape == (4, tokens)
    neck = torch.randn(2, c, *grid)
    with torch.no_grad():
        want = released_sam_adapter(neck, ours.channel_proj, ours.token_proj)
        got = ours(neck.flatten(2).transpose(1, 2))
        honest = build_adapters([sam], D, 4, sam_layout="honest")["sam_v11"]
        honest.load_state_dict(ours.state_dict())  # the same weights, row-major input
        plain = honest(neck.flatten(2).transpose(1, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (plain - want).abs().max() > 1e-2  # the two layouts are not equivalent


def test_released_layout_errors_say_what_to_set():
    with pytest.raises(ValueError, match="even square.*set sam_layout: honest"):
        build_adapters([entry("sam", (8, 8), 16, family="sam")], D, N)
    with pytest.raises(ValueError, match="resample='area'.*set sam_layout: honest"):
        build_adapters([SAM_RESAMPLED], D, N)
    with pytest.raises(ValueError, match="sam_layout must be one of"):
        build_adapters([EVA], D, N, sam_layout="scrambled")
    assert build_adapters([EVA], D, N)["eva"].layout == "row_major"  # only family sam is rearranged


def test_export_spec_keeps_the_layout():
    from student.export import adapter_from_spec, adapter_spec

    ours = build_adapters([entry("sam", (4, 4), 16, family="sam")], D, 4)["sam"]
    spec = adapter_spec(ours)
    assert spec["layout"] == "released_sam" and spec["grid"] == [4, 4]
    back = adapter_from_spec(spec)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 16)
    assert torch.equal(back(x), ours(x))
    old = {k: v for k, v in adapter_spec(build_adapters([EVA], D, N)["eva"]).items() if k not in ("layout", "grid")}
    assert adapter_from_spec(old).layout == "row_major"  # exports written before the field
