"""The LLaVA-1.5 assembly: student vision tower -> projector -> causal LM.

Decisions:
- Vision features are LLaVA's ``select_layer=-2``, ``select_feature="patch"``: the penultimate
  hidden state with the CLS token dropped. ``encode_images`` returns those patch tokens as well as
  their projection, because they are exactly the tensor the MoVE-KD loss pulls toward the teachers.
- The vision tower is any module called as ``tower(pixel_values, output_hidden_states=True)``
  whose output has ``hidden_states`` (HF ``CLIPVisionModel``, or the MoLE-wrapped one).
- Splicing follows LLaVA's ``prepare_inputs_labels_for_multimodal``: each sample's single
  ``IMAGE_TOKEN_INDEX`` sentinel is replaced by its projected patch tokens (labels ``IGNORE_INDEX``
  there), wherever it sits; samples are then re-padded on the right. Only right padding is
  accepted (a left-padded batch is refused, not silently mis-spliced). Nothing is truncated here:
  ``conversation.tokenize_conversation`` already budgets the image tokens in ``max_length``.
- Text-only rows: as in LLaVA, the caller passes all-zero pixels and ``has_image=False``. The tower
  still sees them (their patch tokens are returned, so KD still applies), but nothing is spliced.
  An empty slice of their projection is concatenated, as LLaVA does, so the projector is in the
  graph even for an all-text batch (DDP without ``find_unused_parameters`` needs that).
- Projector keys are ``0.*``/``2.*`` (an ``nn.Sequential``), the layout of LLaVA's ``mm_projector``.
- Activation checkpointing on the LLM is non-reentrant, so it works when the LLM is frozen and
  its inputs carry no grad (stage 1, all-text batches) without ``enable_input_require_grads``.
- The tower loads strictly (``load_vision_tower``): the released tower is the vision half of a
  full ``CLIPModel`` checkpoint, whose text tower is dropped in one logged line (transformers'
  key-by-key report is held back, ``cache.load_report``); a weight the tower needs and the
  checkpoint lacks, or one of the wrong shape, is an error, never a silent random init.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

from cache.load_report import LOAD_NOTES, NOTE, dropped_weights_note, held_load_report
from student.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class Projector(nn.Sequential):
    """``linear`` or ``mlp{N}x_gelu`` (LLaVA's names); ``mlp2x_gelu`` is Linear, GELU, Linear."""

    def __init__(self, kind: str, vision_dim: int, llm_dim: int):
        if kind == "linear":
            layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        elif match := _MLP.match(kind):
            depth = int(match.group(1))
            if depth < 1:
                raise ValueError(f"projector {kind!r}: depth must be at least 1")
            layers = [nn.Linear(vision_dim, llm_dim)]
            for _ in range(depth - 1):
                layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        else:
            raise ValueError(f"unknown projector {kind!r}; use 'linear' or 'mlp<N>x_gelu'")
        super().__init__(*layers)
        self.kind = kind


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> Projector:
    """Factory by name: ``"mlp2x_gelu"`` (LLaVA-1.5), ``"linear"``, ``"mlp3x_gelu"``..."""
    return Projector(kind, vision_dim, llm_dim)


def _hidden_states(output) -> Sequence[torch.Tensor]:
    states = output["hidden_states"] if isinstance(output, Mapping) else output.hidden_states
    if states is None:
        raise ValueError("vision tower returned no hidden_states (output_hidden_states ignored?)")
    return states


class LlavaStudent(nn.Module):
    """Vision tower + projector + causal LM, with LLaVA's image-token splicing."""

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module,
        llm: nn.Module,
        vision_layer: int = -2,
        num_prefix_tokens: int = 1,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.vision_layer = vision_layer
        self.num_prefix_tokens = num_prefix_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (patch tokens ``[B, N, Dv]`` = hidden_states[-2][:, 1:], projected ``[B, N, Dllm]``).

        The patch tokens are the tensor the KD loss compares with the teachers."""
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        patches = _hidden_states(out)[self.vision_layer][:, self.num_prefix_tokens :]
        weight = next(self.projector.parameters())
        return patches, self.projector(patches.to(weight.dtype))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Switch (non-reentrant) activation checkpointing on the LLM; disables its KV cache."""
        llm = self.llm
        if enabled:
            kwargs = {"use_reentrant": False}
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            llm.config.use_cache = False
        elif hasattr(llm, "activation_checkpointing_disable"):
            llm.activation_checkpointing_disable()
        else:
            llm.gradient_checkpointing_disable()

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether any LLM block checkpoints its activations (version-independent check)."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.llm.modules())

    def splice(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor,
        projected: torch.Tensor | None,
        has_image: Sequence[bool],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Replace each image row's sentinel by its projected tokens; re-pad on the right.

        Returns ``(inputs_embeds [B, L', D], labels [B, L'] or None, attention_mask [B, L'])``.
        """
        _check_right_padded(attention_mask)
        if any(has_image) and (projected is None or projected.shape[0] != input_ids.shape[0]):
            raise ValueError("splice needs one projected image per batch row when any has_image")
        text = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        lengths = attention_mask.sum(dim=1).tolist()
        sentinels = (input_ids == IMAGE_TOKEN_INDEX).nonzero().tolist()
        embeds, new_labels = [], []
        for b, n in enumerate(lengths):
            at = [pos for row, pos in sentinels if row == b]
            _check_sentinels(at, bool(has_image[b]), n, b)
            lab = labels[b, :n] if labels is not None else None
            if has_image[b]:
                p, img = at[0], projected[b].to(text.dtype)
                embeds.append(torch.cat([text[b, :p], img, text[b, p + 1 : n]]))
                if lab is not None:
                    ignore = lab.new_full((img.shape[0],), IGNORE_INDEX)
                    lab = torch.cat([lab[:p], ignore, lab[p + 1 :]])
            else:
                tail = projected[b, :0].to(text.dtype) if projected is not None else text[b, :0]
                embeds.append(torch.cat([text[b, :n], tail]))
            new_labels.append(lab)
        return _pad_right(embeds, new_labels if labels is not None else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | Sequence[bool] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """-> ``{"loss": text loss (None without labels), "logits", "labels" (spliced),
        "patch_tokens": [B, N, Dv] or None without pixels}``.

        ``has_image`` defaults to all True when pixels are given, all False otherwise.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = input_ids.shape[0]
        if has_image is None:
            has_image = [pixel_values is not None] * batch
        has_image = [bool(h) for h in torch.as_tensor(has_image).tolist()]
        if len(has_image) != batch:
            raise ValueError(f"has_image has {len(has_image)} entries for a batch of {batch}")
        patches = projected = None
        if pixel_values is not None:
            if pixel_values.shape[0] != batch:
                raise ValueError(f"{pixel_values.shape[0]} images for a batch of {batch} rows")
            patches, projected = self.encode_images(pixel_values)
        elif any(has_image):
            raise ValueError("has_image marks rows with images but no pixel_values were given")
        embeds, labels, mask = self.splice(input_ids, labels, attention_mask, projected, has_image)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
        return {"loss": out.loss, "logits": out.logits, "labels": labels, "patch_tokens": patches}


def _check_right_padded(attention_mask: torch.Tensor) -> None:
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError("attention_mask is not right-padded (ones then zeros per row)")


def _check_sentinels(positions: list[int], has_image: bool, length: int, row: int) -> None:
    if any(p >= length for p in positions):
        raise ValueError(f"batch row {row}: image sentinel inside the padding")
    if has_image and len(positions) != 1:
        raise ValueError(f"batch row {row}: has_image=True needs exactly one image sentinel, found {len(positions)}")
    if not has_image and positions:
        raise ValueError(f"batch row {row}: has_image=False but the text holds an image sentinel")


def _pad_right(embeds: list[torch.Tensor], labels: list[torch.Tensor] | None):
    width = max(e.shape[0] for e in embeds)
    first = embeds[0]
    out = first.new_zeros((len(embeds), width, first.shape[-1]))
    mask = torch.zeros((len(embeds), width), dtype=torch.long, device=first.device)
    lab = None if labels is None else torch.full_like(mask, IGNORE_INDEX)
    for b, e in enumerate(embeds):
        out[b, : e.shape[0]] = e
        mask[b, : e.shape[0]] = 1
        if lab is not None:
            lab[b, : e.shape[0]] = labels[b]
    return out, lab, mask


def collate(samples: Sequence[Mapping], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (``pad_token_id``) and ``labels`` (``IGNORE_INDEX``), add
    ``attention_mask``; stack ``pixel_values`` and ``has_image`` when every sample has them."""
    if not samples:
        raise ValueError("collate got no samples")
    if pad_token_id is None or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a non-negative id, got {pad_token_id!r}")
    width = max(int(s["input_ids"].shape[0]) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        if s["labels"].shape[0] != n:
            raise ValueError(f"sample {b}: input_ids and labels differ in length")
        ids[b, :n], labels[b, :n], mask[b, :n] = s["input_ids"], s["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    for key in ("pixel_values", "has_image"):
        if all(key in s for s in samples):
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return batch


def default_attn_implementation(dtype: torch.dtype | None = None) -> str:
    """``flash_attention_2`` on CUDA with flash_attn installed and a half dtype, else ``sdpa``."""
    half = dtype in (torch.float16, torch.bfloat16)
    if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def build_llava(
    vision_path,
    llm_path,
    projector: str = "mlp2x_gelu",
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> LlavaStudent:
    """Load a CLIP vision tower and a causal LM with ``from_pretrained`` and join them with a
    freshly initialised projector (in ``torch_dtype``, default float32)."""
    attn = attn_implementation or default_attn_implementation(torch_dtype)
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn}
    vision = load_vision_tower(vision_path, **kwargs)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, **kwargs)
    llm_dim = llm.get_input_embeddings().embedding_dim
    proj = build_projector(projector, vision.config.hidden_size, llm_dim)
    model = LlavaStudent(vision, proj.to(torch_dtype or torch.float32), llm)
    if gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


def load_vision_tower(path, **kwargs) -> CLIPVisionModel:
    """``CLIPVisionModel.from_pretrained(path)``, strict: missing or mismatched weights are a
    ``ValueError`` (after transformers' own report); the other towers of a full ``CLIPModel``
    checkpoint are dropped with one line on the ``movekd.load`` logger."""
    with held_load_report() as report:
        vision, info = CLIPVisionModel.from_pretrained(path, output_loading_info=True, **kwargs)
    missing, mismatched = sorted(info.get("missing_keys") or []), sorted(map(str, info.get("mismatched_keys") or []))
    if missing or mismatched:
        report.release()
        raise ValueError(
            f"vision_tower {str(path)!r} is not a complete CLIP vision checkpoint: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''} ({len(missing)}), mismatched {mismatched[:6]}"
        )
    if info.get("unexpected_keys"):
        arch = (AutoConfig.from_pretrained(path).architectures or [None])[0]
        note = dropped_weights_note("student", "CLIPVisionModel", str(path), info["unexpected_keys"], arch)
        logging.getLogger(LOAD_NOTES).info(note, extra=NOTE)
    return vision
