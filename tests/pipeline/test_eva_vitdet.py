"""The released EVA-02 ViTDet teacher (``eva_vitdet``) against a plain-torch forward of the tests.

``reference_forward`` (``tests/pipeline/eva_vitdet_reference.py``) recomputes the backbone from the
checkpoint's tensors alone, in float64, without the module under test (window loops with zero
padding, written-out softmax attention and RoPE, bicubic resize as interpolation matrices). The
tiny checkpoints are saved in the released layout (detectron2 ``model`` nesting, ``backbone.net.``
prefix, head weights and RoPE buffers that must be ignored).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.teachers import TeacherSpec, build_teacher, describe_teacher
from pipeline.teachers.eva_vitdet import EvaViTDet, EvaViTDetConfig
from pipeline.teachers.eva_vitdet_teacher import load_eva_vitdet
from tests.pipeline.eva_vitdet_reference import reference_forward

TINY = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, window_size=4, global_blocks=[1, 3], pretrain_img_size=48)
PREFIX = "backbone.net."
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 teacher vs the float64 reference (tokens reach |x| ~ 15)


# -- tiny checkpoints in the released layout ---------------------------------------------------
def random_backbone(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every backbone tensor, perturbed so that no bias or norm is at its identity init."""
    torch.manual_seed(seed)
    model = EvaViTDet(EvaViTDetConfig(**cfg))
    return {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}


def released_layout(backbone: dict[str, torch.Tensor], nest: str = "model") -> dict:
    """A detectron2-style checkpoint: the backbone under ``backbone.net.``, plus detector heads and
    the RoPE buffers (stale values, as the loader must recompute them), plus trainer scalars."""
    state = {PREFIX + k: v for k, v in backbone.items()}
    state[PREFIX + "rope_win.freqs_cos"] = torch.full((16, 16), 7.0)
    state[PREFIX + "blocks.0.attn.rope.freqs_sin"] = torch.full((16, 16), 7.0)
    state["backbone.simfp_2.0.weight"] = torch.randn(4, 4)
    state["roi_heads.box_predictor.0.cls_score.weight"] = torch.randn(3, 4)
    return {nest: state, "iteration": 1234, "trainer": {"lr": 0.1}}


def spec_for(path, cfg: dict, **extra) -> TeacherSpec:
    kwargs = {k: v for k, v in cfg.items() if k != "img_size"}
    return TeacherSpec(
        name="eva", family="eva_vitdet", source=str(path), resolution=cfg["img_size"], model_kwargs=kwargs, **extra
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = {**TINY, "img_size": 128}  # a 16 x 16 grid: 4 x 4 windows of 4
    backbone = random_backbone(cfg)
    path = tmp_path_factory.mktemp("eva") / "eva02_tiny_det.pth"
    torch.save(released_layout(backbone), path)
    return cfg, backbone, path


def pixels(b: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("img_size", [128, 80])  # 16 x 16 tokens; 10 x 10 (windows padded to 12 x 12)
def test_teacher_matches_the_independent_forward(tmp_path, img_size):
    cfg = {**TINY, "img_size": img_size}
    backbone = random_backbone(cfg, seed=img_size)
    path = tmp_path / "eva.pth"
    torch.save(released_layout(backbone), path)
    teacher = build_teacher(spec_for(path, cfg))
    x = pixels(2, img_size)
    got = teacher.encode(x).tokens
    want = reference_forward(backbone, cfg, x)
    grid = img_size // 8
    assert got.shape == (2, grid * grid, 64) and teacher.native_grid == (grid, grid)
    diff = (got.double() - want).abs().max().item()
    print(f"eva_vitdet {grid}x{grid}: max |teacher - reference| = {diff:.2e} (|ref| max {want.abs().max():.2f})")
    torch.testing.assert_close(got.double(), want, **TOL)
    assert want.std() > 0.5  # the tokens are not trivially small


def test_each_part_of_the_reference_matters(tiny):
    """The comparison can fail: the reference with one released detail changed moves far away."""
    cfg, backbone, _ = tiny
    x = pixels(1, cfg["img_size"])
    model = EvaViTDet(EvaViTDetConfig(**cfg))
    model.load_state_dict(backbone)
    with torch.no_grad():  # in float64 (the RoPE tables stay fp32-computed, as released): ~1e-6
        got = model.double()(x.double()).reshape(1, -1, 64)
    assert (got - reference_forward(backbone, cfg, x)).abs().max() < 1e-5
    variants = [
        {**cfg, "global_blocks": [3]},  # block 1 windowed instead of global
        {**cfg, "window_size": 8},  # other windows
    ]
    for variant in variants:
        assert (got - reference_forward(backbone, variant, x)).abs().max() > 1e-2
    no_q_bias = dict(backbone)
    for i in range(cfg["depth"]):
        no_q_bias[f"blocks.{i}.attn.q_bias"] = torch.zeros_like(no_q_bias[f"blocks.{i}.attn.q_bias"])
    assert (got - reference_forward(no_q_bias, cfg, x)).abs().max() > 1e-2


def test_released_nesting_prefix_and_rope_buffers(tiny, tmp_path):
    cfg, backbone, path = tiny
    model = load_eva_vitdet(spec_for(path, cfg))
    assert all(torch.equal(model.state_dict()[k], backbone[k]) for k in backbone)
    cos, sin = model.rope_win_cos, model.rope_glb_sin  # recomputed, not the checkpoint's 7.0
    assert cos.shape == (16, 16) and sin.shape == (256, 16) and cos.abs().max() <= 1.0
    other = random_backbone(cfg, seed=5)
    for nest, winner in (("ema_state", other), ("module", other)):  # ema_state/module win over model
        ck = released_layout(backbone)
        ck[nest] = released_layout(winner)["model"]
        torch.save(ck, tmp_path / f"{nest}.pth")
        loaded = load_eva_vitdet(spec_for(tmp_path / f"{nest}.pth", cfg)).state_dict()
        assert torch.equal(loaded["blocks.0.attn.q_bias"], winner["blocks.0.attn.q_bias"])


def test_safetensors_equals_pth(tiny, tmp_path):
    from safetensors.torch import save_file

    cfg, backbone, path = tiny
    st = tmp_path / "eva.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in backbone.items()}, st)
    x = pixels(1, cfg["img_size"])
    a = build_teacher(spec_for(path, cfg)).encode(x).tokens
    b = build_teacher(spec_for(st, cfg)).encode(x).tokens
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, named",
    [
        ("drop", "blocks.2.attn.q_bias"),  # missing
        ("add", "blocks.0.attn.k_bias"),  # unexpected (the released attention has no k bias)
        ("reshape", "pos_embed"),  # a pos embed for another pretrain grid
    ],
)
def test_strict_loading_names_the_key(tiny, tmp_path, change, named):
    cfg, backbone, _ = tiny
    state = dict(backbone)
    if change == "drop":
        del state[named]
    elif change == "add":
        state[named] = torch.zeros(64)
    else:
        state[named] = torch.zeros(1, 50, 64)
    torch.save(released_layout(state), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=rf"teacher eva: not an EVA-02 ViTDet backbone.*'{named}"):
        build_teacher(spec_for(tmp_path / "bad.pth", cfg))


def test_a_checkpoint_that_needs_pickle_is_refused_with_the_conversion(tiny, tmp_path):
    cfg, backbone, _ = tiny
    ck = released_layout(backbone)
    ck["cfg"] = argparse.Namespace(lr=0.1)  # detectron2 trainers save such objects
    path = tmp_path / "pickled.pth"
    torch.save(ck, path)
    with pytest.raises(ValueError, match="needs pickle") as err:
        build_teacher(spec_for(path, cfg))
    message = str(err.value)
    assert "argparse.Namespace" in message and "safetensors" in message and "trusted" in message
    snippet = message.split("\n", 1)[1]
    assert len(snippet.splitlines()) == 3
    exec(snippet, {})  # what the user runs (here the file is ours, so it is trusted)
    converted = tmp_path / "pickled.safetensors"
    x = pixels(1, cfg["img_size"])
    got = build_teacher(spec_for(converted, cfg)).encode(x).tokens
    torch.testing.assert_close(got.double(), reference_forward(backbone, cfg, x), **TOL)


def test_missing_source_and_file_are_clear_errors(tiny, tmp_path):
    cfg, _, _ = tiny
    with pytest.raises(ValueError, match="needs 'source'.*eva02_L_coco_det_sys_o365.pth"):
        build_teacher(spec_for("", cfg))
    with pytest.raises(ValueError, match="does not exist"):
        build_teacher(spec_for(tmp_path / "nope.pth", cfg))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_teacher(spec_for(tmp_path / "junk.pth", cfg))
    with pytest.raises(ValueError, match="unknown field"):
        describe_teacher(spec_for("", {**cfg, "depht": 3}))


def test_window_attention_is_one_sdpa_call_per_block(tiny, monkeypatch):
    cfg, backbone, path = tiny
    model = load_eva_vitdet(spec_for(path, cfg))
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(pixels(2, cfg["img_size"]))
    # blocks 0, 2 windowed: 2 images x 16 windows of 16 tokens; blocks 1, 3 global: 2 x 256 tokens
    assert calls == [(32, 4, 16, 16), (2, 4, 256, 16), (32, 4, 16, 16), (2, 4, 256, 16)]


def test_the_released_teacher_describes_offline_with_the_released_shapes():
    info = describe_teacher(TeacherSpec(name="eva", family="eva_vitdet"))
    assert (info.native_grid, info.grid, info.channels, info.tokens, info.has_cls) == (
        (64, 64),
        (64, 64),
        1024,
        4096,
        False,
    )
    pre = info.preprocess
    assert (pre.resolution, pre.resize, pre.crop, pre.interpolation) == (1024, "shortest_edge", "center", "bicubic")
    assert np.allclose(pre.mean, (0.48145466, 0.4578275, 0.40821073)) and np.allclose(
        pre.std, (0.26862954, 0.26130258, 0.27577711)
    )
    assert describe_teacher(TeacherSpec(name="eva", family="eva_vitdet", aspect="pad")).preprocess.aspect == "pad"


def test_the_released_architecture_has_the_released_parameters():
    """On the meta device: the key set and shapes the released checkpoint's backbone has."""
    with torch.device("meta"):
        model = EvaViTDet(EvaViTDetConfig())
        out = model(torch.empty(1, 3, 1024, 1024))
    assert tuple(out.shape) == (1, 64, 64, 1024)
    sd = model.state_dict()
    # patch w+b, pos; per block: norm1 2, q/k/v 3, q/v bias 2, proj 2, norm2 2, w1/w2/w3 6, ffn_ln 2
    assert len(sd) == 3 + 24 * 19 and not any("rope" in k for k in sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["pos_embed"] == (1, 197, 1024) and shapes["patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert shapes["blocks.0.mlp.w1.weight"] == (2730, 1024) and shapes["blocks.23.mlp.ffn_ln.weight"] == (2730,)
    assert {k.split(".", 3)[3] for k in sd if k.startswith("blocks.5.attn.")} == {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"
    }  # fmt: skip
    assert [b.window for b in model.blocks] == [0 if i in (2, 5, 8, 11, 14, 17, 20, 23) else 16 for i in range(24)]
    assert sum(v.numel() for v in sd.values()) == pytest.approx(303e6, rel=0.02)


def test_bf16_autocast_stays_close_to_fp32(tiny):
    cfg, _, path = tiny
    x = pixels(2, cfg["img_size"])
    fp32 = build_teacher(spec_for(path, cfg)).encode(x).tokens
    bf16 = build_teacher(spec_for(path, cfg, compute_dtype="bfloat16")).encode(x).tokens
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).norm() / fp32.norm() < 3e-2


def test_the_kernel_choice(tiny, monkeypatch):
    """Flash first on CUDA in 16 bit (then memory-efficient, then math); PyTorch's choice otherwise."""
    import torch.nn.attention as attention
    from torch.nn.attention import SDPBackend

    from pipeline.teachers import eva_vitdet_teacher as mod

    cuda = torch.device("cuda")
    want = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert mod.sdpa_backends(cuda, torch.bfloat16) == want == mod.sdpa_backends(cuda, torch.float16)
    assert (
        mod.sdpa_backends(cuda, torch.float32) is None
        and mod.sdpa_backends(torch.device("cpu"), torch.bfloat16) is None
    )
    cfg, _, path = tiny
    teacher = build_teacher(spec_for(path, cfg))
    seen = []
    real = attention.sdpa_kernel

    def recording(backends, set_priority=False):
        seen.append((list(backends), set_priority))
        return real(backends, set_priority=set_priority)

    monkeypatch.setattr(mod, "sdpa_backends", lambda device, dtype: [SDPBackend.MATH])
    monkeypatch.setattr(attention, "sdpa_kernel", recording)
    teacher.encode(pixels(1, cfg["img_size"]))
    assert seen == [([SDPBackend.MATH], True)]
