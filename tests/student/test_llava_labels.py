"""Answer labels equal LLaVA's ``preprocess_v1`` token for token, under a real SentencePiece model.

A tiny SentencePiece BPE model (byte fallback, like Llama's) is trained here, offline, on a few
hundred generated lines, wrapped as a Hugging Face ``LlamaTokenizer`` in both ``legacy`` modes,
saved, and loaded back with ``AutoTokenizer.from_pretrained``. The reference is an independent
re-implementation of LLaVA's round-splitting rule (``llava/train/train.py`` ``preprocess_v1`` with
``preprocess_multimodal`` and ``mm_utils.tokenizer_image_token``), including its ``legacy``
correction for rounds after the first.

The corpus is chosen so that the tiny model tokenises like vicuna-7b-v1.5's: ``" USER"`` is
``"▁"`` + ``"USER"`` (Llama: ``▁US`` + ``ER``) while ``"USER"`` right after ``</s>`` is one token
without ``legacy`` (Llama: 11889), which is the case LLaVA's ``-1`` correction was written for.
The test checks that property first, and that LLaVA's rule reports no "tokenization mismatch"
on any conversation (otherwise the reference would be all-ignored and the comparison empty).
"""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

sentencepiece = pytest.importorskip("sentencepiece")

from transformers import AutoTokenizer, LlamaTokenizer  # noqa: E402
from transformers.tokenization_utils_base import generate_merges  # noqa: E402

from student.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VICUNA_SYSTEM, tokenize_conversation  # noqa: E402

WORDS = (
    "the a cat dog sat on mat what is color of sky blue red green how many legs does have "
    "picture shows man woman car tree house yes no answer question image describe"
).split()
LONE_SPACE = "▁"


def _corpus(rng: random.Random) -> list[str]:
    lines = [VICUNA_SYSTEM] * 20
    for i in range(400):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        if i % 3 == 0:
            a = f"{rng.randint(0, 999)} {a}"
        lines.append(f"{q} ASSISTANT: {a}</s>USER: {q}?")
    return lines


@pytest.fixture(scope="module")
def spm_model() -> tuple[bytes, list[str]]:
    lines = _corpus(random.Random(0))
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue(), lines


def save_llama_tokenizer(model: bytes, directory, legacy: bool) -> str:
    """Wrap a SentencePiece BPE model as HF's ``LlamaTokenizer`` (vocab and merges read with the
    sentencepiece API, as transformers' converter does) and save it, pad token unset, ``legacy``
    recorded in ``tokenizer_config.json`` as vicuna's is; BOS added, as Llama's does."""
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=legacy, add_bos_token=True)
    tok.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "legacy": legacy}))
    return str(directory)


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non_legacy"])
def tok(request, spm_model, tmp_path_factory):
    path = save_llama_tokenizer(spm_model[0], tmp_path_factory.mktemp("spm"), request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.legacy is request.param and tokenizer.is_fast and tokenizer.pad_token is None
    return tokenizer


# -- the reference: LLaVA's rule, written out -------------------------------------------------------
def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """``llava.mm_utils.tokenizer_image_token``: each chunk tokenised with BOS, BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


def llava_preprocess_v1(conversations, tokenizer, has_image: bool):
    """-> (input_ids, labels, mismatch) as ``preprocess_v1`` builds them (conv_vicuna_v1)."""
    turns = [dict(t) for t in conversations]
    if has_image:  # preprocess_multimodal
        for t in turns:
            if "<image>" in t["value"]:
                t["value"] = ("<image>\n" + t["value"].replace("<image>", "").strip()).strip()
    if turns[0]["from"] != "human":
        turns = turns[1:]
    prompt = VICUNA_SYSTEM + " "
    for j, t in enumerate(turns):
        prompt += ("USER", "ASSISTANT")[j % 2] + ": " + t["value"] + (" ", "</s>")[j % 2]

    def encode(text):
        return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    input_ids = torch.tensor(encode(prompt))
    target = input_ids.clone()
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(encode(rou))
        instruction_len = len(encode(parts[0])) - 2
        if i != 0 and not tokenizer.legacy:  # IS_TOKENIZER_GREATER_THAN_0_14 holds here
            round_len -= 1
            instruction_len -= 1
        target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    mismatch = cur_len != len(input_ids)
    if mismatch:
        target[:] = IGNORE_INDEX
    return input_ids.tolist(), target.tolist(), mismatch


def chat(*pairs):
    return [{"from": r, "value": v} for q, a in pairs for r, v in (("human", q), ("gpt", a))]


CONVERSATIONS = {
    "digit-answer": (chat(("<image>\nHow many legs does a dog have?", "4")), True),
    "newline-answer": (chat(("What is the color of the sky?\n<image>", "\nblue sky")), True),
    "multi-round": (
        chat(
            ("<image>\nWhat does the picture show?", "a man and a dog"),
            ("How many cats?", "12 cats on a mat"),
            ("And the car?", "\n\nred car"),
            ("Is it a tree?", "yes"),
        ),
        True,
    ),
    "multi-round-text-only": (
        chat(("how many legs does a cat have", "4 legs"), ("and a man", "\n2"), ("describe the sky", "blue")),
        False,
    ),
    "image-without-placeholder": (chat(("what is the answer", "7"), ("the color", "\ngreen")), True),
    "leading-gpt-turn": ([{"from": "gpt", "value": "hi"}] + chat(("<image>\nwhat", "3 dogs")), True),
}


def test_the_tiny_model_tokenises_like_vicunas(tok, spm_model):
    """The wrap is the SentencePiece model (legacy mode, no special tokens), and USER after </s>
    behaves as with vicuna: one token fewer than at a text start without ``legacy``."""
    model, lines = spm_model
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    if tok.legacy:  # (sentencepiece reads "</s>" as text: compare the pieces between them)
        texts = [t for line in lines for t in line.split("</s>")]
        assert all(tok(t, add_special_tokens=False).input_ids == sp.encode(t) for t in texts)
    assert tok("a").input_ids[0] == tok.bos_token_id == 1
    assert tok.convert_ids_to_tokens(tok(" USER:", add_special_tokens=False).input_ids) == [LONE_SPACE, "USER", ":"]
    after_eos = tok.convert_ids_to_tokens(tok("a</s>USER:", add_special_tokens=False).input_ids)[2:]
    assert after_eos == ([LONE_SPACE, "USER", ":"] if tok.legacy else ["USER", ":"])
    assert tok.convert_ids_to_tokens(tok("ASSISTANT: 4", add_special_tokens=False).input_ids)[-2:] == [
        LONE_SPACE,
        "4",
    ]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_equal_llava_preprocess_v1(tok, name):
    conv, has_image = CONVERSATIONS[name]
    ref_ids, ref_labels, mismatch = llava_preprocess_v1(conv, tok, has_image)
    assert not mismatch, "LLaVA's own rule disagrees with the tokenisation: the reference would be empty"
    assert any(label != IGNORE_INDEX for label in ref_labels)
    out = tokenize_conversation(conv, tok, "vicuna_v1", has_image=has_image, max_length=4096, num_image_tokens=16)
    assert out["input_ids"].tolist() == ref_ids
    assert out["labels"].tolist() == ref_labels


def test_the_lone_space_before_a_digit_or_newline_answer_is_supervised(tok):
    conv = chat(("<image>\nhow many", "4"), ("and now", "\nno"))
    out = tokenize_conversation(conv, tok, "vicuna_v1", has_image=True, num_image_tokens=16)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    pieces = tok.convert_ids_to_tokens([i for i in ids if i >= 0])
    supervised = [tok.convert_ids_to_tokens(i) for i in labels if i != IGNORE_INDEX]
    assert supervised == [LONE_SPACE, "4", "</s>", LONE_SPACE, "<0x0A>", "no", "</s>"]
    assert pieces.count(LONE_SPACE) >= 2


def test_a_tokenizer_without_pad_gets_unk_and_the_first_batch_collates(tok, spm_model, tmp_path):
    """LLaVA's ``pad_token = unk_token``: loading (training and inference use ``load_tokenizer``)
    fills it in; ``collate`` of a first batch then pads with unk instead of refusing None."""
    from student.conversation import load_tokenizer
    from student.llava import collate

    path = save_llama_tokenizer(spm_model[0], tmp_path, tok.legacy)
    assert AutoTokenizer.from_pretrained(path).pad_token_id is None
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([{"input_ids": torch.ones(1), "labels": torch.ones(1)}], None)  # what loading alone gave
    loaded = load_tokenizer(path)
    assert loaded.pad_token == loaded.unk_token == "<unk>" and loaded.pad_token_id == 0
    rows = [chat(("<image>\nhow many", "4")), chat(("what", "a man and a dog"), ("more", "no"))]
    samples = [
        tokenize_conversation(c, loaded, "vicuna_v1", has_image=i == 0, num_image_tokens=16) for i, c in enumerate(rows)
    ]
    batch = collate(samples, loaded.pad_token_id)
    short = len(samples[0]["input_ids"])
    assert (batch["input_ids"][0, short:] == 0).all() and (batch["labels"][0, short:] == IGNORE_INDEX).all()
