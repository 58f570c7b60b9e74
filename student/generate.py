"""Answer questions with a student: LLaVA's evaluation prompt, image splicing, the LLM's ``generate``.

Decisions:
- The prompt is LLaVA's evaluation prompt (``model_vqa_loader.py``): ``"<image>\\n" + question`` as
  the human turn (no ``<image>`` for text-only questions), an empty assistant turn, rendered with
  the conversation template (``vicuna_v1``: ``"{system} USER: <image>\\nQ ASSISTANT:"``; ``plain``:
  ``"<image>\\nQ\\n"``) and tokenised with ``student.conversation.encode_prompt`` (the training
  tokenisation: BOS, ``<image>`` -> ``IMAGE_TOKEN_INDEX``).
- The vision tower runs once per image, before generation; each row's sentinel is replaced by its
  projected tokens (``LlavaStudent.splice`` on that row alone), rows are LEFT-padded as decoder-only
  generation needs, and the LLM's own ``generate`` runs from ``inputs_embeds`` with its KV cache,
  so per new token only the LLM's last position is computed.
- Greedy by default (``temperature=0``, ``num_beams=1``: LLaVA's evaluation setting), which is
  deterministic on CPU. Sampling uses the caller's torch RNG.
- Images go through ``cache.preprocess.preprocess_image`` with the student's own spec (the stage's
  ``square``/``pad`` aspect), the same function training and extraction use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from cache.manifest import PreprocessSpec
from cache.preprocess import preprocess_image
from student.conversation import IMAGE_PLACEHOLDER, encode_prompt, get_template
from student.llava import LlavaStudent


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; the defaults are LLaVA's evaluation ones (greedy, 128 new tokens)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    num_beams: int = 1
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {self.max_new_tokens}, {self.num_beams}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def generation_prompt(question: str, template: str, has_image: bool) -> str:
    """LLaVA's evaluation prompt for one question (the assistant turn left open)."""
    tpl = get_template(template)
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if not question and not has_image:
        raise ValueError("empty question without an image: nothing to answer")
    turn = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
    if tpl.name == "plain":
        return turn + tpl.sep
    return f"{tpl.system}{tpl.sep}{tpl.roles[0]}: {turn}{tpl.sep}{tpl.roles[1]}:"


def prompt_ids(question: str, tokenizer, template: str, has_image: bool) -> list[int]:
    """Token ids of ``generation_prompt`` (one ``IMAGE_TOKEN_INDEX`` sentinel for image prompts)."""
    return encode_prompt(generation_prompt(question, template, has_image), [], tokenizer)[0]


def _llava(model) -> LlavaStudent:
    llava = getattr(model, "llava", model)
    if not isinstance(llava, LlavaStudent):
        raise ValueError(f"generate needs a LlavaStudent or DistillModel, got {type(model).__name__}")
    return llava


def _pixels(images: Sequence[Image.Image | None], spec: PreprocessSpec, device, dtype) -> torch.Tensor | None:
    present = [preprocess_image(im, spec) for im in images if im is not None]
    if not present:
        return None
    return torch.from_numpy(np.stack(present)).to(device=device, dtype=dtype)


def embed_prompts(
    model, ids: Sequence[Sequence[int]], pixel_values: torch.Tensor | None, has_image: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spliced, LEFT-padded ``(inputs_embeds [B, L, D], attention_mask [B, L])`` for ``generate``.

    ``pixel_values`` holds one row per ``True`` in ``has_image``, in order."""
    llava = _llava(model)
    projected = llava.encode_images(pixel_values)[1] if pixel_values is not None else None
    rows, k = [], 0
    device = next(llava.llm.parameters()).device
    for row_ids, image in zip(ids, has_image):
        t = torch.tensor([row_ids], dtype=torch.long, device=device)
        proj = projected[k : k + 1] if image else None
        k += int(image)
        embeds, _, _ = llava.splice(t, None, torch.ones_like(t), proj, [image])
        rows.append(embeds[0])
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        out[b, width - r.shape[0] :] = r
        mask[b, width - r.shape[0] :] = 1
    return out, mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    questions: Sequence[str],
    images: Sequence[Image.Image | None],
    preprocess: PreprocessSpec,
    template: str = "vicuna_v1",
    config: GenerationConfig | None = None,
) -> list[str]:
    """Answer ``questions[i]`` about ``images[i]`` (``None``: a text-only question), as one batch.

    Returns the decoded answers (special tokens dropped, whitespace stripped)."""
    ids = generate_ids(model, tokenizer, questions, images, preprocess, template, config)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    questions: Sequence[str],
    images: Sequence[Image.Image | None],
    preprocess: PreprocessSpec,
    template: str = "vicuna_v1",
    config: GenerationConfig | None = None,
) -> list[list[int]]:
    """``generate`` before decoding: the new token ids per question, up to and without EOS."""
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions for {len(images)} images")
    if not questions:
        return []
    cfg = config or GenerationConfig()
    llava = _llava(model)
    has_image = [im is not None for im in images]
    ids = [prompt_ids(q, tokenizer, template, h) for q, h in zip(questions, has_image)]
    weight = next(llava.vision_tower.parameters())
    pixels = _pixels(images, preprocess, weight.device, weight.dtype)
    embeds, mask = embed_prompts(llava, ids, pixels, has_image)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sample = cfg.temperature > 0
    kwargs = {"temperature": cfg.temperature, "top_p": cfg.top_p} if sample else {}
    out = llava.llm.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        num_beams=cfg.num_beams,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
        **kwargs,
    )
    return [_until_eos(row.tolist(), eos) for row in out]


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    """Cut at the first EOS (rows that stopped early are padded after it)."""
    return row[: row.index(eos)] if eos is not None and eos in row else row


class ContinuationScore(NamedTuple):
    """``score_continuation``'s result: summed log-probability, scored token count, greedy or not."""

    logprob: float
    num_tokens: int
    is_greedy: bool


@torch.no_grad()
def score_continuation(
    model,
    tokenizer,
    context: str,
    continuation: str,
    image: Image.Image | None,
    preprocess: PreprocessSpec,
    template: str = "vicuna_v1",
) -> ContinuationScore:
    """``log p(continuation | prompt)`` (summed over its tokens), as LLaVA's evaluation scores a choice.

    The prompt is ``generation_prompt(context)``; the continuation fills the assistant turn and is
    closed by the template's ``sep2`` (``</s>`` for ``vicuna_v1``), which is scored too, as in
    LLaVA's ``model_vqa_loader``-style likelihood (``conv.messages[1][1] = continuation``). The
    scored tokens are the ones the training labeler supervises for that answer span, so
    tokenisation at the boundary is the training one. ``is_greedy``: every scored token is the
    argmax of the full forward's logits at its position."""
    llava = _llava(model)
    tpl = get_template(template)
    prompt = generation_prompt(context, template, image is not None)
    full = prompt + ("" if tpl.name == "plain" else " ") + continuation + tpl.sep2
    ids, labels = encode_prompt(full, [(len(prompt), len(full))], tokenizer)
    if all(lab < 0 for lab in labels):
        raise ValueError(f"continuation {continuation!r} produced no tokens to score")
    weight = next(llava.vision_tower.parameters())
    pixels = _pixels([image], preprocess, weight.device, weight.dtype)
    device = next(llava.llm.parameters()).device
    out = llava(
        torch.tensor([ids], device=device),
        labels=torch.tensor([labels], device=device),
        pixel_values=pixels,
        has_image=[image is not None],
    )
    logits, target = out["logits"][0, :-1].float(), out["labels"][0, 1:]
    scored = target >= 0
    logp = torch.log_softmax(logits[scored], dim=-1)
    picked = target[scored]
    total = float(logp.gather(1, picked[:, None]).sum())
    return ContinuationScore(total, int(picked.numel()), bool((logp.argmax(dim=-1) == picked).all()))
