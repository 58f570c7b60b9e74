"""Generation: LLaVA's evaluation prompt written out here, greedy decoding equal to a hand-written
argmax loop over the full forward (no KV cache), batched equal to one question at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from cache.manifest import PreprocessSpec
from student.conversation import IMAGE_TOKEN_INDEX
from student.generate import GenerationConfig, generate, generate_ids, generation_prompt, prompt_ids
from student.llava import build_llava
from student.mole import MoLEConfig, add_mole
from student.tiny import make_tiny_llava_parts

SPEC = PreprocessSpec(resolution=56)
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    p = make_tiny_llava_parts(root)
    torch.manual_seed(0)
    model = build_llava(p.vision, p.llm, attn_implementation="sdpa")
    add_mole(model.vision_tower, MoLEConfig(rank=4))
    return model.eval(), AutoTokenizer.from_pretrained(p.tokenizer)


def photo(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_prompts_are_llavas_eval_prompts(parts):
    _, tok = parts
    assert generation_prompt("What is it?", "vicuna_v1", True) == f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    assert generation_prompt("What is it?", "vicuna_v1", False) == f"{SYSTEM} USER: What is it? ASSISTANT:"
    assert generation_prompt("<image>\nWhat is it?", "plain", True) == "<image>\nWhat is it?\n"
    ids = prompt_ids("What is it?", tok, "vicuna_v1", True)
    want = (
        [tok.bos_token_id]
        + tok(f"{SYSTEM} USER: ", add_special_tokens=False)["input_ids"]
        + [IMAGE_TOKEN_INDEX]
        + tok("\nWhat is it? ASSISTANT:", add_special_tokens=False)["input_ids"]
    )
    assert ids == want
    with pytest.raises(ValueError, match="unknown template"):
        generation_prompt("q", "llama_3", True)


def argmax_loop(model, tok, question, image, steps):
    """Greedy decoding by hand: the full forward over the whole sequence for every new token."""
    ids = prompt_ids(question, tok, "vicuna_v1", image is not None)
    emb = model.llm.get_input_embeddings()
    pieces = []
    if image is not None:
        at = ids.index(IMAGE_TOKEN_INDEX)
        from cache.preprocess import preprocess_image

        pixels = torch.from_numpy(preprocess_image(image, SPEC))[None]
        out = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        pieces = [emb(torch.tensor([ids[:at]])), model.projector(out), emb(torch.tensor([ids[at + 1 :]]))]
    else:
        pieces = [emb(torch.tensor([ids]))]
    seq, new = torch.cat(pieces, dim=1), []
    for _ in range(steps):
        nxt = int(model.llm(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], dim=1)
    return new


QUESTIONS = ["What is in the image?", "How many dogs are there?", "Tell me a joke."]


@torch.no_grad()
def test_greedy_equals_a_full_forward_argmax_loop(parts):
    model, tok = parts
    images = [photo(60, 80, 1), photo(90, 56, 2), None]
    cfg = GenerationConfig(max_new_tokens=12)
    for q, im in zip(QUESTIONS, images):
        got = generate_ids(model, tok, [q], [im], SPEC, config=cfg)[0]
        assert got == argmax_loop(model, tok, q, im, 12)
        assert 0 < len(got) <= 12


@torch.no_grad()
def test_batched_equals_one_at_a_time_and_is_deterministic(parts):
    model, tok = parts
    images = [photo(60, 80, 1), None, photo(90, 56, 2)]
    cfg = GenerationConfig(max_new_tokens=10)
    batched = generate_ids(model, tok, QUESTIONS, images, SPEC, config=cfg)
    single = [generate_ids(model, tok, [q], [im], SPEC, config=cfg)[0] for q, im in zip(QUESTIONS, images)]
    assert batched == single
    assert generate_ids(model, tok, QUESTIONS, images, SPEC, config=cfg) == batched
    text = generate(model, tok, QUESTIONS, images, SPEC, config=cfg)
    assert text == [tok.decode(r, skip_special_tokens=True).strip() for r in batched]


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="nothing to answer"):
        generation_prompt("  ", "vicuna_v1", False)
