"""LLaVA-1.5 conversation templates and tokenisation with label masking.

Two templates, as in LLaVA's ``conversation.py``:
- ``plain`` (stage 1, LLaVA's ``preprocess_plain``): the human turn is replaced by ``<image>``
  alone and the target is the caption followed by the template's sep, ``"\\n"`` (LLaVA's
  ``conv_llava_plain`` ends the caption with that sep, not with EOS). Exactly two turns, image
  required.
- ``vicuna_v1`` (stage 2, LLaVA's ``preprocess_v1`` with ``conv_vicuna_v1``):
  ``"{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"``. Only the
  assistant answers and their ``</s>`` are supervised.

Decisions:
- Labels come from character spans, not from LLaVA's length arithmetic (``len(tokenize(round))``,
  ``- 2``, the ``legacy``/tokenizers-version corrections), which silently misaligns every label when
  a tokenizer merges differently and then only warns. Here the whole prompt is rendered once, each
  supervised span (answer + stop sep) is recorded in characters, the prompt is tokenised with
  offsets (a fast tokenizer is required) and a token is supervised iff its characters overlap a
  span. ``input_ids`` are therefore exactly LLaVA's, and so are the labels: a ``vicuna_v1`` span
  starts at the space after ``"ASSISTANT:"``, because LLaVA masks ``len(tokenize("... ASSISTANT: "))
  - 2`` tokens, i.e. up to the ``":"``, so it supervises the lone ``"▁"`` SentencePiece emits
  before an answer that starts with a digit or a newline (id 29871 for Llama). The tests compare
  with LLaVA's rule token for token under a SentencePiece Llama tokenizer in both ``legacy`` modes.
- ``<image>`` handling follows LLaVA's ``preprocess_multimodal`` + ``tokenizer_image_token``: the
  placeholder is moved to the front of its turn (``"<image>\\n" + rest``), the prompt is split on
  it, the pieces are tokenised without special tokens, BOS (if the tokenizer adds one) goes in
  front, and the placeholder becomes the single id ``IMAGE_TOKEN_INDEX`` (-200) that the model
  later replaces by the image features. Text-only rows have no sentinel.
- Validation raises ``ValueError`` naming the row id: unknown roles, roles not alternating
  human/gpt, a trailing human turn, empty values, more than one ``<image>``, ``<image>`` outside a
  human turn, ``<image>`` in a row without an image, and (``plain`` only, where LLaVA asserts it)
  an image row without ``<image>``. A ``vicuna_v1`` image row without the placeholder is kept, as
  LLaVA keeps it: it renders with no sentinel, so the LLM sees no image tokens, while its image
  still gets KD and the balance loss (``has_placeholder`` tells the data layer which rows these
  are). A leading gpt turn is dropped, as LLaVA does.
- Pad token: a tokenizer without one gets ``pad = unk`` (``load_tokenizer``/``ensure_pad_token``),
  as LLaVA sets it (``train.py:966-968``; Llama/vicuna ship no pad token). Padded positions are
  masked and unsupervised, so the id only has to exist.
- ``max_length`` counts the sequence the LLM will see, i.e. the sentinel as ``num_image_tokens``
  positions (LLaVA truncates after splicing, to ``model_max_length``). Longer rows are truncated at
  the tail; if that would cut into the image features, or leave nothing supervised, the row is
  refused with ``ConversationTooLong`` (a ``ValueError``) so the data layer can skip it and count
  why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    """A LLaVA conversation template. ``sep`` ends human turns (and plain captions), ``sep2``
    ends assistant turns (two-separator style)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", system="", roles=("", ""), sep="\n", sep2="\n"),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>"),
}


class ConversationTooLong(ValueError):
    """The row cannot be fitted into ``max_length`` without losing its image or all its targets."""


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _validate_turns(
    conversations: Sequence[Mapping], has_image: bool, rid: str, placeholder_optional: bool = False
) -> list[tuple[str, str]]:
    """Check roles, values and ``<image>`` placement; return (role, value) pairs."""
    if not all(isinstance(t, Mapping) for t in conversations):
        raise ValueError(f"row {rid}: every turn must be a mapping with 'from' and 'value'")
    turns = [(str(t.get("from", "")), t.get("value")) for t in conversations]
    if turns and turns[0][0] == GPT:
        turns = turns[1:]  # LLaVA skips a leading gpt turn
    if not turns:
        raise ValueError(f"row {rid}: conversation has no human/gpt turns")
    n_images = 0
    for i, (role, value) in enumerate(turns):
        if role not in (HUMAN, GPT):
            raise ValueError(f"row {rid}: turn {i} has unknown role {role!r} (want human/gpt)")
        if role != (HUMAN, GPT)[i % 2]:
            raise ValueError(f"row {rid}: turn {i} is from {role!r}; roles must alternate human, gpt")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"row {rid}: turn {i} ({role}) has an empty or non-string value")
        count = value.count(IMAGE_PLACEHOLDER)
        if count and role != HUMAN:
            raise ValueError(f"row {rid}: turn {i} ({role}) contains {IMAGE_PLACEHOLDER}")
        n_images += count
    if turns[-1][0] != GPT:
        raise ValueError(f"row {rid}: conversation ends with a human turn (no answer to supervise)")
    if n_images > 1:
        raise ValueError(f"row {rid}: {n_images} {IMAGE_PLACEHOLDER} placeholders (at most one)")
    if has_image and n_images == 0 and not placeholder_optional:
        raise ValueError(f"row {rid}: row has an image but no {IMAGE_PLACEHOLDER} in its text")
    if not has_image and n_images:
        raise ValueError(f"row {rid}: {IMAGE_PLACEHOLDER} in the text of a row without an image")
    return turns


def _image_to_front(value: str) -> str:
    """LLaVA's ``preprocess_multimodal``: ``"<image>\\n" + rest`` for the turn holding the image."""
    if IMAGE_PLACEHOLDER not in value:
        return value
    rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
    return (IMAGE_PLACEHOLDER + "\n" + rest).strip()


def render(
    conversations: Sequence[Mapping], template: str | Template, has_image: bool, row_id=None
) -> tuple[str, list[tuple[int, int]]]:
    """Render a row into the prompt string and its supervised character spans ``[start, end)``."""
    tpl, rid = get_template(template), "?" if row_id is None else row_id
    turns = _validate_turns(conversations, has_image, str(rid), placeholder_optional=tpl.name != "plain")
    if tpl.name == "plain":
        if len(turns) != 2 or not has_image:
            raise ValueError(
                f"row {rid}: template plain needs exactly one human+gpt pair and an image "
                f"(got {len(turns)} turns, has_image={has_image})"
            )
        prompt = IMAGE_PLACEHOLDER + turns[1][1] + tpl.sep
        return prompt, [(len(IMAGE_PLACEHOLDER), len(prompt))]
    prompt, spans = tpl.system + tpl.sep, []
    for role, value in turns:
        if role == HUMAN:
            prompt += f"{tpl.roles[0]}: {_image_to_front(value)}{tpl.sep}"
        else:
            prompt += f"{tpl.roles[1]}: "
            start = len(prompt) - 1  # the space after "ASSISTANT:", where LLaVA's labels start
            prompt += value + tpl.sep2
            spans.append((start, len(prompt)))
    return prompt, spans


def has_placeholder(conversations: Sequence[Mapping]) -> bool:
    """Whether any turn holds ``<image>`` (a ``vicuna_v1`` image row may lack it; see above)."""
    return any(isinstance(t, Mapping) and IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in conversations)


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` LLaVA's ``pad_token = unk_token`` when it has no pad token; returns it."""
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an unk token: "
                "set a pad token in its tokenizer_config.json (LLaVA pads with unk)"
            )
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def load_tokenizer(path, **kwargs):
    """``AutoTokenizer.from_pretrained(path)`` with ``ensure_pad_token`` (training and inference)."""
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(path, **kwargs))


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] if the tokenizer puts BOS in front of its encodings (Llama/Vicuna do), else []."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if ids and bos is not None and ids[0] == bos else []


def encode_prompt(prompt: str, spans: Sequence[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenise ``prompt`` (``<image>`` -> sentinel) and label tokens overlapping ``spans``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_conversation needs a fast tokenizer (offset mapping)")
    supervised = bytearray(len(prompt))
    for start, end in spans:
        supervised[start:end] = b"\x01" * (end - start)
    ids = _bos_prefix(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    base = 0
    for k, piece in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            base += len(IMAGE_PLACEHOLDER)
        if piece:
            enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
                ids.append(tid)
                hit = e > s and any(supervised[base + s : base + e])
                labels.append(tid if hit else IGNORE_INDEX)
        base += len(piece)
    return ids, labels


def _truncate(ids, labels, max_length, num_image_tokens, rid):
    """Cut the tail so the spliced length fits; refuse rows that would lose the image or targets."""
    image_at = ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in ids else None
    limit = max_length - (num_image_tokens - 1 if image_at is not None else 0)
    if len(ids) <= limit:
        return ids, labels
    if image_at is not None and image_at >= limit:
        raise ConversationTooLong(
            f"row {rid}: the {num_image_tokens} image tokens at position {image_at} "
            f"do not fit in max_length={max_length}"
        )
    ids, labels = ids[:limit], labels[:limit]
    if all(label == IGNORE_INDEX for label in labels):
        raise ConversationTooLong(f"row {rid}: nothing supervised is left after truncation to max_length={max_length}")
    return ids, labels


def tokenize_conversation(
    row_conversations: Sequence[Mapping],
    tokenizer,
    template: str | Template = "vicuna_v1",
    has_image: bool = True,
    max_length: int = 2048,
    *,
    num_image_tokens: int = 576,
    row_id=None,
) -> dict[str, torch.Tensor]:
    """Tokenise one row's ``conversations`` into ``input_ids`` and ``labels`` (1-D LongTensors).

    ``num_image_tokens`` is how many positions the sentinel expands to (576 for CLIP-L/336); it
    counts against ``max_length``. ``row_id`` only names the row in error messages.
    """
    rid = "?" if row_id is None else row_id
    if num_image_tokens < 1 or max_length < 1:
        raise ValueError(
            f"row {rid}: num_image_tokens ({num_image_tokens}) and max_length ({max_length}) must be positive"
        )
    prompt, spans = render(row_conversations, template, has_image, row_id=rid)
    ids, labels = encode_prompt(prompt, spans, tokenizer)
    ids, labels = _truncate(ids, labels, max_length, num_image_tokens, rid)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def tokenize_row(
    row: Mapping,
    tokenizer,
    template: str | Template = "vicuna_v1",
    max_length: int = 2048,
    *,
    num_image_tokens: int = 576,
) -> dict[str, torch.Tensor]:
    """``tokenize_conversation`` for a LLaVA JSON row (id, optional image, conversations)."""
    rid = row.get("id", "?")
    if not isinstance(row.get("conversations"), list):
        raise ValueError(f"row {rid}: 'conversations' is missing or not a list")
    return tokenize_conversation(
        row["conversations"],
        tokenizer,
        template,
        has_image=bool(row.get("image")),
        max_length=max_length,
        num_image_tokens=num_image_tokens,
        row_id=rid,
    )
