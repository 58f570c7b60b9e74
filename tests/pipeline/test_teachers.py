"""The teacher registry: every family built from tiny real-architecture checkpoints, compared with
a direct forward of the same checkpoint loaded independently here through the real loaders.

Tolerance 1e-5 (abs and rel): both sides run the same fp32 kernels on CPU; only op order differs
(e.g. our CLS-attention row vs the eager attention matrix).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from skimage import data

from cache.manifest import TeacherEntry
from cache.preprocess import null_image_tensor, preprocess_image
from pipeline.teachers import (
    TINY_FAMILIES,
    TeacherSpec,
    build_teacher,
    describe_teacher,
    list_teachers,
    make_tiny_teachers,
)
from pipeline.teachers.base import weights_fingerprint
from pipeline.teachers.hf import pix2struct_patches
from tests.pipeline.eva_vitdet_reference import reference_forward

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, TeacherSpec]:
    specs = make_tiny_teachers(tmp_path_factory.mktemp("tiny_teachers"))
    return {family: spec for family, spec in zip(TINY_FAMILIES, specs)}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(data.chelsea()), Image.fromarray(data.camera())]  # non-square RGB, greyscale


def pixels_for(teacher, photos) -> torch.Tensor:
    return torch.from_numpy(np.stack([preprocess_image(im, teacher.preprocess_spec) for im in photos]))


def timm_model(spec: TeacherSpec, arch: str, **extra) -> torch.nn.Module:
    model = timm.create_model(arch, pretrained=False, **extra, **spec.model_kwargs)
    model.load_state_dict(load_file(spec.source))  # strict
    return model.eval()


def output_of(module: torch.nn.Module, run) -> torch.Tensor:
    """The output of ``module`` during ``run()``, caught with a forward hook."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        run()
    finally:
        handle.remove()
    return seen[-1]


def expected_tokens(family: str, spec: TeacherSpec, x: torch.Tensor) -> torch.Tensor:
    """The teacher's tokens, computed from the model's own outputs (independent load)."""
    import transformers as tf

    if family == "clip":
        return tf.CLIPVisionModel.from_pretrained(spec.source)(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    if family == "dinov2":
        return tf.Dinov2Model.from_pretrained(spec.source)(x).last_hidden_state[:, 1:]
    if family == "siglip":
        return tf.SiglipVisionModel.from_pretrained(spec.source)(x, output_hidden_states=True).hidden_states[-2]
    if family == "hf":
        return tf.ViTModel.from_pretrained(spec.source)(x).last_hidden_state[:, 1:]
    if family == "sam":
        feats = tf.SamVisionModel.from_pretrained(spec.source)(x).last_hidden_state  # [B, C, H, W]
        return feats.flatten(2).transpose(1, 2)
    if family == "pix2struct":
        return pix2struct_reference(spec, x)
    if family == "eva":  # the released EVA-02 ViTDet (family eva_vitdet), from its checkpoint tensors alone
        state = {k.removeprefix("backbone.net."): v for k, v in load_file(spec.source).items()}
        return reference_forward(state, {**spec.model_kwargs, "img_size": spec.resolution}, x).float()
    if family == "eva_timm":
        model = timm_model(spec, "eva02_large_patch14_224", img_size=spec.resolution)
        return output_of(model.blocks[-1], lambda: model.forward_features(x))[:, model.num_prefix_tokens :]
    if family == "timm":
        model = timm_model(spec, "vit_small_patch16_224")
        return output_of(model.blocks[-1], lambda: model.forward_features(x))[:, model.num_prefix_tokens :]
    if family == "convnext":
        model = timm_model(spec, "convnext_xxlarge")
        return model.forward_features(x).flatten(2).transpose(1, 2)  # norm_pre is Identity: stage-4 output
    raise AssertionError(family)


def pix2struct_reference(spec: TeacherSpec, x: torch.Tensor) -> torch.Tensor:
    """HF's own Pix2Struct processor on the uint8 crop (no resize: the grid fills max_patches exactly)."""
    import transformers as tf
    from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil

    images = [Image.fromarray(np.rint(im.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for im in x]
    proc = Pix2StructImageProcessorPil(patch_size={"height": 8, "width": 8}, max_patches=64)
    inputs = proc(images=images, return_tensors="pt")
    assert inputs["attention_mask"].all()  # a full 8x8 grid, no padding
    model = tf.Pix2StructVisionModel.from_pretrained(spec.source)
    out = model(flattened_patches=inputs["flattened_patches"], attention_mask=inputs["attention_mask"])
    return out.last_hidden_state


def test_registry_has_every_family():
    families = {"clip", "eva_vitdet", "eva", "convnext", "sam", "pix2struct", "dinov2", "siglip", "hf:", "timm:"}
    assert families <= set(list_teachers())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_teacher_matches_direct_forward(tiny, photos, family):
    spec = tiny[family]
    teacher = build_teacher(spec)
    x = pixels_for(teacher, photos)
    out = teacher.encode(x)
    assert out.tokens.shape == (2, teacher.tokens, teacher.channels) and out.tokens.dtype == torch.float32
    assert teacher.tokens == teacher.grid[0] * teacher.grid[1] and teacher.grid == teacher.native_grid
    assert out.tokens.std(dim=1).min() > 0  # tokens differ across the grid
    with torch.no_grad():
        torch.testing.assert_close(out.tokens, expected_tokens(family, spec, x), **TOL)
    entry = teacher.manifest_entry("int8")
    assert isinstance(entry, TeacherEntry) and TeacherEntry.from_dict(entry.to_dict()) == entry
    assert (entry.grid, entry.channels, entry.codec) == (teacher.grid, teacher.channels, "int8")
    assert entry.compute_dtype == "float32" and entry.layer == teacher.layer
    assert entry.preprocess == teacher.preprocess_spec and entry.source == spec.source
    assert entry.has_cls == (family == "clip") and (out.cls_state is not None) == (family == "clip")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_reload_is_deterministic(tiny, photos, tmp_path, family):
    first, second = build_teacher(tiny[family]), build_teacher(tiny[family])
    again = build_teacher(make_tiny_teachers(tmp_path, families=[family])[0])  # re-made from the seed
    assert first.weights_fingerprint == second.weights_fingerprint == again.weights_fingerprint
    x = pixels_for(first, photos)
    assert torch.equal(first.encode(x).tokens, second.encode(x).tokens)
    assert torch.equal(first.encode(x).tokens, again.encode(x).tokens)
    null = first.encode(null_image_tensor(first.preprocess_spec)[None])  # numpy input, the "no image" row
    assert null.tokens.shape == (1, first.tokens, first.channels) and torch.isfinite(null.tokens).all()


def test_clip_cls_state_and_attention_match_eager_model(tiny, photos):
    from transformers import CLIPVisionModel

    teacher = build_teacher(tiny["clip"])
    x = pixels_for(teacher, photos)
    out = teacher.encode(x)
    eager = CLIPVisionModel.from_pretrained(tiny["clip"].source, attn_implementation="eager")
    with torch.no_grad():
        ref = eager(x, output_hidden_states=True, output_attentions=True)
    assert len(ref.attentions) == 3 and len(ref.hidden_states) == 4
    # attentions[-2] is the attention inside encoder.layers[-2], whose output is hidden_states[-2]
    torch.testing.assert_close(out.cls_attn, ref.attentions[-2][:, :, 0, 1:].mean(dim=1), **TOL)
    torch.testing.assert_close(out.cls_state, ref.hidden_states[-2][:, 0], **TOL)
    assert out.cls_attn.shape == (2, teacher.tokens)
    sums = out.cls_attn.sum(dim=1)
    assert (sums <= 1 + 1e-6).all() and (sums > 0).all() and (out.cls_attn >= 0).all()
    last = build_teacher(TeacherSpec(name="clip_last", family="clip", source=tiny["clip"].source, layer=-1))
    torch.testing.assert_close(last.encode(x).cls_attn, ref.attentions[-1][:, :, 0, 1:].mean(dim=1), **TOL)
    with pytest.raises(ValueError, match="embeddings"):
        build_teacher(TeacherSpec(name="clip0", family="clip", source=tiny["clip"].source, layer=0))


def test_sam_tokens_are_row_major_neck_output(tiny, photos):
    from transformers import SamVisionModel

    teacher = build_teacher(tiny["sam"])
    x = pixels_for(teacher, photos)
    tokens = teacher.encode(x).tokens
    with torch.no_grad():
        neck = SamVisionModel.from_pretrained(tiny["sam"].source)(x).last_hidden_state  # [B, C, H, W]
    rows, cols = teacher.grid
    assert neck.shape[1:] == (teacher.channels, rows, cols)
    for j in (0, 1, cols - 1, cols, rows * cols - 1):
        torch.testing.assert_close(tokens[:, j], neck[:, :, j // cols, j % cols], **TOL)


@pytest.mark.parametrize("family", ["eva", "sam"])
def test_resample_area_and_bilinear(tiny, photos, family):
    native = build_teacher(tiny[family])
    x = pixels_for(native, photos)
    base = native.encode(x).tokens  # 8x8 grid
    b, _, c = base.shape
    area = build_teacher(TeacherSpec(**{**tiny[family].to_dict(), "resample": "area", "resample_grid": (4, 4)}))
    blocks = base.reshape(b, 4, 2, 4, 2, c).mean(dim=(2, 4)).reshape(b, 16, c)  # 2x2 block means
    torch.testing.assert_close(area.encode(x).tokens, blocks, **TOL)
    entry = area.manifest_entry("fp16")
    assert (entry.grid, entry.native_grid, entry.tokens, entry.resample) == ((4, 4), (8, 8), 16, "area")
    bil = build_teacher(TeacherSpec(**{**tiny[family].to_dict(), "resample": "bilinear", "resample_grid": (3, 5)}))
    grid = base.transpose(1, 2).reshape(b, c, 8, 8)
    ref = F.interpolate(grid, size=(3, 5), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(bil.encode(x).tokens, ref, **TOL)
    assert bil.manifest_entry("fp16").grid == (3, 5) and native.manifest_entry("fp16").native_grid is None


def test_clip_teacher_refuses_resampling(tiny):
    with pytest.raises(ValueError, match="cls_attn"):
        build_teacher(
            TeacherSpec(name="clip", family="clip", source=tiny["clip"].source, resample="area", resample_grid=(2, 2))
        )


def test_full_checkpoint_layouts_load_their_vision_tower(tmp_path, photos):
    """The released checkpoints are full models (CLIPModel, SamModel, Pix2Struct image-to-text)."""
    import transformers as tf

    torch.manual_seed(0)
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    models = {
        "clip": tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config={**vit, "image_size": 32, "patch_size": 8})),
        "sam": tf.SamModel(
            tf.SamConfig(
                vision_config=dict(
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=8,
                    output_channels=16,
                    window_size=2,
                    global_attn_indexes=[1],
                    mlp_dim=64,
                )
            )
        ),
        "pix2struct": tf.Pix2StructForConditionalGeneration(
            tf.Pix2StructConfig(
                vision_config=dict(
                    hidden_size=32,
                    patch_embed_hidden_size=192,
                    d_ff=64,
                    d_kv=16,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                ),
                text_config=dict(vocab_size=64, hidden_size=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2),
            )
        ),
    }
    for family, model in models.items():
        model.eval().save_pretrained(tmp_path / family)
        teacher = build_teacher(TeacherSpec(name=family, family=family, source=str(tmp_path / family), resolution=32))
        x = pixels_for(teacher, photos)
        with torch.no_grad():
            if family == "clip":
                ref = model.vision_model(x, output_hidden_states=True).hidden_states[-2][:, 1:]
            elif family == "sam":
                ref = model.vision_encoder(x).last_hidden_state.flatten(2).transpose(1, 2)
            else:
                ref = model.encoder(flattened_patches=pix2struct_patches(x, 8)).last_hidden_state
        torch.testing.assert_close(teacher.encode(x).tokens, ref, **TOL)


def test_generic_family_argument_and_bf16_autocast(tiny, photos):
    ref = build_teacher(tiny["hf"])
    x = pixels_for(ref, photos)
    by_family = build_teacher(TeacherSpec(name="vit", family=f"hf:{tiny['hf'].source}"))
    assert by_family.manifest_entry("fp16").source == tiny["hf"].source
    assert torch.equal(by_family.encode(x).tokens, ref.encode(x).tokens)
    assert ref.preprocess_spec.mean == (0.5, 0.5, 0.5)  # read from the saved preprocessor_config.json
    bf16 = build_teacher(TeacherSpec(**{**tiny["clip"].to_dict(), "compute_dtype": "bfloat16"}))
    assert bf16.manifest_entry("fp16").compute_dtype == "bfloat16"
    x = pixels_for(bf16, photos)
    fp32 = build_teacher(tiny["clip"]).encode(x)
    out = bf16.encode(x)
    assert out.tokens.dtype == torch.float32 and out.cls_attn.dtype == torch.float32
    assert (out.tokens - fp32.tokens).norm() / fp32.tokens.norm() < 3e-2


def test_fingerprint_sees_weight_changes(tiny):
    teacher = build_teacher(tiny["dinov2"])
    info = {"class": "Dinov2Model", "model_kwargs": {}}
    assert weights_fingerprint(teacher.model, info) == teacher.weights_fingerprint
    with torch.no_grad():
        teacher.model.embeddings.patch_embeddings.projection.weight.view(-1)[0] += 1e-3
    assert weights_fingerprint(teacher.model, info) != teacher.weights_fingerprint
    assert weights_fingerprint(teacher.model, {"model_kwargs": {"x": 1}}) != weights_fingerprint(teacher.model, info)


def test_spec_round_trip_and_validation(tiny):
    spec = tiny["eva"]
    assert TeacherSpec.from_dict(spec.to_dict()) == spec
    assert TeacherSpec.from_dict({**spec.to_dict(), "resample_grid": [6, 6]}).resample_grid == (6, 6)
    bad = [
        ({"aspect": "stretch"}, "aspect"),
        ({"resample": "nearest"}, "resample"),
        ({"compute_dtype": "int8"}, "compute_dtype"),
        ({"resample_grid": (0, 4)}, "resample_grid"),
        ({"name": "a/b"}, "name"),
        ({"model_kwargs": {"f": object()}}, "JSON"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            TeacherSpec(**{**spec.to_dict(), **change})
    with pytest.raises(ValueError, match="unknown field"):
        TeacherSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_build_errors_are_value_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown family 'vgg'"):
        build_teacher(TeacherSpec(name="x", family="vgg"))
    wrong = TeacherSpec(**{**tiny["eva_timm"].to_dict(), "source": tiny["convnext"].source})
    with pytest.raises(ValueError, match="cannot load timm"):
        build_teacher(wrong)
    with pytest.raises(ValueError, match="does not exist"):
        build_teacher(TeacherSpec(**{**tiny["eva_timm"].to_dict(), "source": str(tmp_path / "nope.safetensors")}))
    with pytest.raises(ValueError, match="not an EVA-02 ViTDet backbone"):  # a timm EVA-02 is not the released one
        build_teacher(TeacherSpec(**{**tiny["eva"].to_dict(), "source": tiny["eva_timm"].source}))
    with pytest.raises(ValueError, match="not a complete"):  # a DINOv2 checkpoint is not a CLIP one
        build_teacher(TeacherSpec(name="clip", family="clip", source=tiny["dinov2"].source))
    teacher = build_teacher(tiny["dinov2"])
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, 48, 48\]"):
        teacher.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="forward pass"):  # hidden_states has 3 entries
        build_teacher(TeacherSpec(**{**tiny["hf"].to_dict(), "layer": 7}))
    with pytest.raises(ValueError, match="no tiny teacher"):
        make_tiny_teachers(tmp_path, families=["vgg"])


# -- metadata without weights (describe_teacher, movekd extract --dry-run) ------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_description_equals_the_loaded_teacher(tiny, family):
    info = describe_teacher(tiny[family])
    teacher = build_teacher(tiny[family])
    assert (info.preprocess, info.native_grid, info.grid, info.channels, info.layer, info.has_cls) == (
        teacher.preprocess_spec,
        teacher.native_grid,
        teacher.grid,
        teacher.channels,
        teacher.layer,
        teacher.has_cls,
    )
    entry = teacher.manifest_entry("int8")
    assert info.tokens == entry.tokens and info.source == entry.source


def test_released_teachers_describe_offline_without_weights():
    """The v1.1 teacher set at its released defaults: shapes of docs/method.md §2, nothing downloaded."""
    want = {
        "clip": ((24, 24), 1024, 336, True),
        "eva": ((64, 64), 1024, 1024, False),
        "convnext": ((32, 32), 3072, 1024, False),
        "sam": ((64, 64), 256, 1024, False),
    }
    for name, (grid, channels, resolution, has_cls) in want.items():
        family = "eva_vitdet" if name == "eva" else name  # the released eva; family eva is timm's EVA-02
        info = describe_teacher(TeacherSpec(name=name, family=family))
        assert (info.grid, info.channels, info.preprocess.resolution, info.has_cls) == (
            grid,
            channels,
            resolution,
            has_cls,
        )
    sam = describe_teacher(TeacherSpec(name="sam", family="sam"))
    assert sam.source == "facebook/sam-vit-large" and sam.preprocess.resize == "longest_edge"
    resampled = describe_teacher(TeacherSpec(name="eva", family="eva_vitdet", resample="area", resample_grid=(24, 24)))
    timm_eva = describe_teacher(TeacherSpec(name="eva", family="eva", resolution=1024))
    assert (timm_eva.grid, timm_eva.channels) == ((64, 64), 1024)  # same shape, a different network
    assert resampled.native_grid == (64, 64) and resampled.grid == (24, 24)
    assert resampled.stored_bytes_per_image("int8") == 576 * 1024 + 576 * 4  # int8 values + a float32 scale per token


def test_a_wrong_description_is_caught_when_the_teacher_loads(tiny, monkeypatch):
    from pipeline.teachers import registry

    real = registry._INFO["dinov2"]
    monkeypatch.setitem(registry._INFO, "dinov2", lambda spec: dataclasses.replace(real(spec), channels=7))
    with pytest.raises(ValueError, match=r"metadata does not match the loaded model: channels: model=32 metadata=7"):
        build_teacher(tiny["dinov2"])
