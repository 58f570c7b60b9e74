"""Tiny random-weight models and a tokenizer, built on the fly for tests and the demo.

Nothing here touches the network or the model hub: every factory builds a model from a config,
seeds its initialisation, saves it with ``save_pretrained`` and returns the folder, so callers load
it back through the same ``from_pretrained`` path the real checkpoints take.

Decisions:
- The tokenizer is a byte-level BPE trained with the ``tokenizers`` library. Byte-level means any
  text (captions, questions in tests) encodes and decodes exactly, with no ``<unk>`` surprises;
  like Llama's it adds ``<s>`` in front (a post-processor) and knows ``<s>``, ``</s>``, ``<unk>``,
  ``<pad>`` as special tokens, so ``"</s>"`` written in the vicuna template becomes the EOS id.
  ``<image>`` is deliberately not a token: the conversation code splits on it, as LLaVA does.
- Seeding uses ``torch.random.fork_rng`` so building a tiny model never disturbs the caller's RNG.
- The LLM is a ``LlamaForCausalLM`` (Vicuna's architecture) whose vocabulary matches the tokenizer;
  ``make_tiny_llava_parts`` builds all three consistently and is what most callers want.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama's order plus a pad

_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A cat sitting on a red sofa next to a window.",
    "USER: Describe the picture in detail. ASSISTANT: The photo shows a street with cars, people "
    "walking, tall buildings and a blue sky with white clouds.",
    "USER: How many dogs are there? ASSISTANT: There are two dogs playing in the green grass.",
    "a photo of a small boat on a lake at sunset, mountains in the background",
    "Answer the question using a single word or phrase. Yes. No. 1 2 3 4 5 6 7 8 9 0",
)


@dataclass(frozen=True)
class TinyParts:
    """Folders of a consistent tiny tokenizer, causal LM and CLIP vision tower."""

    tokenizer: Path
    llm: Path
    vision: Path


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512, extra_text: tuple[str, ...] = ()) -> Path:
    """Train a byte-level BPE tokenizer, save it as a ``PreTrainedTokenizerFast``, return the dir.

    Load it back with ``AutoTokenizer.from_pretrained(dir)``.
    """
    out = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) + list(extra_text), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    wrapped.save_pretrained(out)
    return out


def make_tiny_llm(
    out_dir: str | Path,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    max_positions: int = 2048,
    seed: int = 0,
) -> Path:
    """Save a seeded random ``LlamaForCausalLM`` (unk 0, bos 1, eos 2, pad 3); return the dir."""
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_clip_vision(
    out_dir: str | Path,
    hidden: int = 32,
    image_size: int = 56,
    patch: int = 14,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    seed: int = 0,
) -> Path:
    """Save a seeded random ``CLIPVisionModel`` ((image_size/patch)^2 patches + CLS); return dir."""
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_llava_parts(out_dir: str | Path, seed: int = 0, **vision_kwargs) -> TinyParts:
    """Build tokenizer, LLM (vocabulary sized to the tokenizer) and vision tower under one dir."""
    root = Path(out_dir)
    tok_dir = make_tiny_tokenizer(root / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    llm_dir = make_tiny_llm(root / "llm", vocab_size=vocab, seed=seed)
    vision_dir = make_tiny_clip_vision(root / "vision", seed=seed, **vision_kwargs)
    return TinyParts(tokenizer=tok_dir, llm=llm_dir, vision=vision_dir)
