"""LLaVA assembly: projector, image-token splicing, loss/backprop, loading tiny saved models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, CLIPVisionModel

from student.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_row
from student.llava import (
    LlavaStudent,
    Projector,
    build_llava,
    build_projector,
    collate,
    default_attn_implementation,
)
from student.tiny import make_tiny_clip_vision, make_tiny_llava_parts

GRID = 16  # tiny CLIP: 56 px / 14 px patches = 4x4
VISION_DIM, LLM_DIM = 32, 64


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_llava_parts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(parts):
    return AutoTokenizer.from_pretrained(parts.tokenizer)


@pytest.fixture()
def model(parts):
    torch.manual_seed(0)
    return build_llava(parts.vision, parts.llm, projector="mlp2x_gelu")


def pixels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 56, 56, generator=g)


def hand_batch():
    """Images at offsets 2 and 5, then a text-only row; right-padded with pad id 3."""
    ids = torch.tensor(
        [
            [1, 40, IMAGE_TOKEN_INDEX, 41, 42, 3, 3],
            [1, 40, 41, 42, 43, IMAGE_TOKEN_INDEX, 44],
            [1, 45, 46, 47, 3, 3, 3],
        ]
    )
    mask = (torch.arange(7) < torch.tensor([[5], [7], [4]])).long()
    labels = torch.where(mask.bool() & (ids >= 40), ids, IGNORE_INDEX)
    return ids, labels, mask


def test_projector_factory():
    mlp = build_projector("mlp2x_gelu", VISION_DIM, LLM_DIM)
    assert isinstance(mlp, Projector) and mlp.kind == "mlp2x_gelu"
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].in_features) == (32, 64, 64)
    assert sorted(mlp.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert len(build_projector("linear", VISION_DIM, LLM_DIM)) == 1
    assert len(build_projector("mlp3x_gelu", VISION_DIM, LLM_DIM)) == 5
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("qformer", VISION_DIM, LLM_DIM)


def test_from_pretrained_loads_saved_tiny_models(parts, model, tmp_path):
    saved = CLIPVisionModel.from_pretrained(parts.vision)
    for name, value in saved.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[name], value)
    assert model.llm.get_input_embeddings().num_embeddings == len(AutoTokenizer.from_pretrained(parts.tokenizer))
    again = make_tiny_clip_vision(tmp_path / "again")  # seeded: same weights twice
    twin = CLIPVisionModel.from_pretrained(again).state_dict()
    assert all(torch.equal(twin[k], v) for k, v in saved.state_dict().items())


def test_encode_images_returns_penultimate_patch_tokens(model):
    x = pixels(2)
    patches, projected = model.encode_images(x)
    ref = model.vision_tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert patches.shape == (2, GRID, VISION_DIM) and projected.shape == (2, GRID, LLM_DIM)
    torch.testing.assert_close(patches, ref)
    torch.testing.assert_close(projected, model.projector(ref))


def capture_llm_inputs(model):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    model.llm.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_splice_places_features_at_sentinels(model):
    ids, labels, mask = hand_batch()
    x = pixels(3)
    x[2] = 0  # text-only row gets zero pixels, as in LLaVA
    seen = capture_llm_inputs(model)
    out = model(ids, labels, mask, x, has_image=torch.tensor([True, True, False]))
    _, projected = model.encode_images(x)
    emb = model.llm.get_input_embeddings()
    rows = [
        torch.cat([emb(ids[0, :2]), projected[0], emb(ids[0, 3:5])]),
        torch.cat([emb(ids[1, :5]), projected[1], emb(ids[1, 6:7])]),
        emb(ids[2, :4]),
    ]
    width = 7 - 1 + GRID
    assert seen["inputs_embeds"].shape == (3, width, LLM_DIM)
    for b, row in enumerate(rows):
        n = row.shape[0]
        torch.testing.assert_close(seen["inputs_embeds"][b, :n], row)
        assert (seen["inputs_embeds"][b, n:] == 0).all()
        assert seen["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
    assert (out["labels"][0, 2 : 2 + GRID] == IGNORE_INDEX).all()
    assert (out["labels"][1, 5 : 5 + GRID] == IGNORE_INDEX).all()
    assert out["labels"][1, 5 + GRID] == 44 and out["labels"][0, 2 + GRID] == 41
    assert out["labels"][2, :4].tolist() == [IGNORE_INDEX, 45, 46, 47]
    assert out["patch_tokens"].shape == (3, GRID, VISION_DIM)  # KD sees the text-only row too


def test_loss_finite_and_gradients_reach_projector_and_vision(model):
    ids, labels, mask = hand_batch()
    out = model(ids, labels, mask, pixels(3), has_image=[True, True, False])
    assert torch.isfinite(out["loss"])
    (out["loss"] + out["patch_tokens"].pow(2).mean()).backward()
    for p in model.projector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    vision = dict(model.vision_tower.named_parameters())
    fc1 = next(p for n, p in vision.items() if n.endswith("layers.0.mlp.fc1.weight"))
    last = next(p for n, p in vision.items() if n.endswith("layers.1.mlp.fc1.weight"))
    assert fc1.grad.abs().sum() > 0
    assert last.grad is None  # hidden_states[-2]: the last block is not used, as in LLaVA
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_all_text_batch_keeps_projector_in_graph(model):
    ids, labels, mask = hand_batch()
    ids, labels, mask = ids[2:], labels[2:], mask[2:]
    out = model(ids, labels, mask, torch.zeros(1, 3, 56, 56), has_image=[False])
    out["loss"].backward()
    grad = model.projector[0].weight.grad
    assert grad is not None and (grad == 0).all()  # used (DDP-safe) but not trained by text


def test_text_only_without_pixels(model):
    ids, labels, mask = hand_batch()
    out = model(ids[2:], labels[2:], mask[2:])
    assert out["patch_tokens"] is None and torch.isfinite(out["loss"])


def test_splice_errors(model):
    ids, labels, mask = hand_batch()
    with pytest.raises(ValueError, match="batch row 2: has_image=True"):
        model(ids, labels, mask, pixels(3), has_image=[True, True, True])
    with pytest.raises(ValueError, match="batch row 0: has_image=False"):
        model(ids, labels, mask, pixels(3), has_image=[False, True, False])
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, labels, mask.flip(1), pixels(3), has_image=[True, True, False])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, labels, mask, None, has_image=[True, True, False])


def test_collate_pads_right():
    a = {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])}
    b = {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])}
    batch = collate([a, b], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([a], pad_token_id=-1)


def test_end_to_end_rows_to_loss(model, tok):
    rows = [
        {
            "id": "a",
            "image": "x.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the image?"},
                {"from": "gpt", "value": "A cat on a sofa."},
            ],
        },
        {
            "id": "b",
            "conversations": [{"from": "human", "value": "How many dogs are there?"}, {"from": "gpt", "value": "Two."}],
        },
    ]
    samples = [tokenize_row(r, tok, "vicuna_v1", num_image_tokens=GRID) for r in rows]
    for s, r in zip(samples, rows):
        s["has_image"] = "image" in r
        s["pixel_values"] = pixels(1)[0] if "image" in r else torch.zeros(3, 56, 56)
    batch = collate(samples, pad_token_id=tok.pad_token_id)
    model.set_gradient_checkpointing(True)
    model.train()
    out = model(**batch)
    out["loss"].backward()
    assert model.gradient_checkpointing and torch.isfinite(out["loss"])
    assert model.projector[2].weight.grad.abs().sum() > 0
    model.set_gradient_checkpointing(False)
    assert not model.gradient_checkpointing


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("flash", [False, True])
def test_default_attention_kernel(monkeypatch, cuda, flash):
    """flash-attention-2 exactly when CUDA, the flash_attn package and a 16-bit dtype all hold."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" and flash else real(n, *a)
    )
    for dtype in (torch.bfloat16, torch.float16):
        assert default_attn_implementation(dtype) == ("flash_attention_2" if cuda and flash else "sdpa")
    assert default_attn_implementation(torch.float32) == "sdpa"
    assert default_attn_implementation(None) == "sdpa"


def test_student_accepts_any_tower_with_hidden_states():
    class Tower(torch.nn.Module):
        def forward(self, x, output_hidden_states=False):
            h = x.flatten(2).transpose(1, 2)  # [B, HW, C]
            return {"hidden_states": (h, h * 2, h * 3)}

    llm_stub = torch.nn.Module()
    student = LlavaStudent(Tower(), build_projector("linear", 3, 8), llm_stub)
    patches, projected = student.encode_images(torch.ones(2, 3, 2, 2))
    assert patches.shape == (2, 3, 3) and (patches == 2).all() and projected.shape == (2, 3, 8)
