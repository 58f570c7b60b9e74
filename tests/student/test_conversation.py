"""Templates, label masking, the image sentinel, validation and truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from student.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    VICUNA_SYSTEM,
    ConversationTooLong,
    has_placeholder,
    render,
    tokenize_conversation,
    tokenize_row,
)
from student.tiny import make_tiny_tokenizer

N_IMG = 16  # a 4x4 tiny vision grid


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def turn(role, value):
    return {"from": role, "value": value}


def chat(*pairs):
    return [turn(r, v) for q, a in pairs for r, v in (("human", q), ("gpt", a))]


def supervised_runs(tok, labels):
    """Decode each maximal run of supervised labels."""
    runs, cur = [], []
    for label in labels.tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            cur.append(label)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


def decode_with_image(tok, ids):
    ids = ids.tolist()
    pieces, cur = [], []
    for i in ids:
        if i == IMAGE_TOKEN_INDEX:
            pieces.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
        else:
            cur.append(i)
    pieces.append(tok.decode(cur, skip_special_tokens=False))
    return "<image>".join(pieces)


def test_vicuna_supervises_exactly_the_answers(tok):
    conv = chat(
        ("What is in the picture?\n<image>", "A cat sitting on a red sofa."),
        ("How many dogs?", "12 dogs, playing"),
        ("Anything else?", "No."),
    )
    out = tokenize_conversation(conv, tok, "vicuna_v1", has_image=True, num_image_tokens=N_IMG)
    runs = supervised_runs(tok, out["labels"])
    assert [r.strip() for r in runs] == [
        "A cat sitting on a red sofa.</s>",
        "12 dogs, playing</s>",
        "No.</s>",
    ]
    assert out["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 1
    assert out["input_ids"][0] == tok.bos_token_id
    mask = out["labels"] != IGNORE_INDEX
    assert (out["labels"][mask] == out["input_ids"][mask]).all()
    expected = (
        f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT: "
        "A cat sitting on a red sofa.</s>USER: How many dogs? ASSISTANT: 12 dogs, playing</s>"
        "USER: Anything else? ASSISTANT: No.</s>"
    )
    assert decode_with_image(tok, out["input_ids"]) == expected  # <image> moved to the front


def test_plain_replaces_question_by_image(tok):
    conv = chat(("<image>\nDescribe the image briefly.", "a small boat on a lake"))
    out = tokenize_conversation(conv, tok, "plain", has_image=True, num_image_tokens=N_IMG)
    ids = out["input_ids"].tolist()
    assert ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert supervised_runs(tok, out["labels"]) == ["a small boat on a lake\n"]
    assert decode_with_image(tok, out["input_ids"]) == "<s><image>a small boat on a lake\n"


def test_text_only_row_has_no_sentinel(tok):
    row = {"id": "sharegpt-1", "conversations": chat(("Tell me a joke.", "No jokes today."))}
    out = tokenize_row(row, tok, "vicuna_v1", num_image_tokens=N_IMG)
    assert IMAGE_TOKEN_INDEX not in out["input_ids"].tolist()
    assert [r.strip() for r in supervised_runs(tok, out["labels"])] == ["No jokes today.</s>"]


def test_leading_gpt_turn_is_dropped_like_llava(tok):
    conv = [turn("gpt", "ignored preamble")] + chat(("<image>\nWhat?", "A dog."))
    prompt, spans = render(conv, "vicuna_v1", has_image=True)
    assert "ignored preamble" not in prompt
    assert [prompt[s:e] for s, e in spans] == [" A dog.</s>"]  # from the space after "ASSISTANT:", as LLaVA


def test_image_row_without_placeholder_is_kept_without_sentinel(tok):
    """LLaVA keeps such rows (``tokenizer_image_token`` on a prompt with no ``<image>``): the same
    ids and labels as the text-only rendering, no sentinel; ``plain`` refuses them (LLaVA asserts)."""
    conv = chat(("What is this?", "A dog."), ("Sure?", "Yes."))
    with_image = tokenize_conversation(conv, tok, "vicuna_v1", has_image=True, num_image_tokens=N_IMG)
    text_only = tokenize_conversation(conv, tok, "vicuna_v1", has_image=False, num_image_tokens=N_IMG)
    assert IMAGE_TOKEN_INDEX not in with_image["input_ids"].tolist()
    assert with_image["input_ids"].tolist() == text_only["input_ids"].tolist()
    assert with_image["labels"].tolist() == text_only["labels"].tolist()
    assert not has_placeholder(conv) and has_placeholder(chat(("<image>\nQ", "A")))
    with pytest.raises(ValueError, match="row p: row has an image but no <image>"):
        tokenize_conversation(chat(("Describe.", "A dog.")), tok, "plain", True, row_id="p")


def test_tokenize_row_uses_image_key(tok):
    row = {"id": "x", "image": "coco/1.jpg", "conversations": chat(("<image>\nQ?", "A."))}
    out = tokenize_row(row, tok, "vicuna_v1", num_image_tokens=N_IMG)
    assert out["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 1


BAD_ROWS = {
    "wrong-order": ([turn("human", "<image>\nQ"), turn("human", "Q2"), turn("gpt", "A")], True),
    "empty-value": (chat(("<image>\nQ", "  ")), True),
    "two-images": (chat(("<image>\nQ <image>", "A")), True),
    "image-in-answer": (chat(("Q", "A <image>")), False),
    "unknown-role": ([turn("human", "<image>\nQ"), turn("bot", "A")], True),
    "ends-with-human": (chat(("<image>\nQ", "A")) + [turn("human", "more?")], True),
    "placeholder-without-image": (chat(("<image>\nQ", "A")), False),
    "not-a-string": ([turn("human", "<image>\nQ"), turn("gpt", None)], True),
}


@pytest.mark.parametrize("rid", sorted(BAD_ROWS))
def test_malformed_rows_name_the_id(tok, rid):
    conv, has_image = BAD_ROWS[rid]
    with pytest.raises(ValueError, match=f"row {rid}"):
        tokenize_conversation(conv, tok, "vicuna_v1", has_image, row_id=rid)


def test_plain_rejects_multi_turn_and_text_only(tok):
    two_rounds = chat(("<image>\nQ", "A"), ("Q2", "A2"))
    with pytest.raises(ValueError, match="row multi.*plain"):
        tokenize_conversation(two_rounds, tok, "plain", True, row_id="multi")
    with pytest.raises(ValueError, match="row txt"):
        tokenize_conversation(chat(("Q", "A")), tok, "plain", False, row_id="txt")


def test_unknown_template(tok):
    with pytest.raises(ValueError, match="unknown template"):
        tokenize_conversation(chat(("Q", "A")), tok, "llama_3", False)


def test_max_length_counts_image_tokens_and_truncates_tail(tok):
    conv = chat(("<image>\nDescribe.", "word " * 200), ("More?", "yes"))
    full = tokenize_conversation(conv, tok, "vicuna_v1", True, 4096, num_image_tokens=N_IMG)
    n = len(full["input_ids"])
    exact = n + N_IMG - 1
    fits = tokenize_conversation(conv, tok, "vicuna_v1", True, exact, num_image_tokens=N_IMG)
    assert fits["input_ids"].tolist() == full["input_ids"].tolist()
    limit = 120
    cut = tokenize_conversation(conv, tok, "vicuna_v1", True, limit, num_image_tokens=N_IMG)
    assert len(cut["input_ids"]) + N_IMG - 1 == limit
    assert cut["input_ids"].tolist() == full["input_ids"][: limit - N_IMG + 1].tolist()
    assert cut["labels"].tolist() == full["labels"][: limit - N_IMG + 1].tolist()
    assert IMAGE_TOKEN_INDEX in cut["input_ids"].tolist()


def test_truncation_refuses_to_cut_the_image(tok):
    # <image> moves to the front of its own turn, so put it in a later turn behind a long one.
    late = chat(("Long question " * 30, "ok"), ("<image>\nQ2", "A2"))
    with pytest.raises(ConversationTooLong, match="row late.*image tokens"):
        tokenize_conversation(late, tok, "vicuna_v1", True, 80, num_image_tokens=N_IMG, row_id="late")


def test_truncation_refuses_rows_with_nothing_supervised(tok):
    conv = chat(("Question " * 100, "answer"))
    with pytest.raises(ConversationTooLong, match="row q.*nothing supervised"):
        tokenize_conversation(conv, tok, "vicuna_v1", False, 50, row_id="q")


def test_bad_sizes(tok):
    with pytest.raises(ValueError, match="must be positive"):
        tokenize_conversation(chat(("Q", "A")), tok, "vicuna_v1", False, num_image_tokens=0)
