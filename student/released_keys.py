"""The released MoVE-KD checkpoint layout <-> this project's ``DistillModel``: the key map.

Released key names follow the released module tree (hey-cjj/MoVE-KD, transformers 4.37):

- ``MoVELlavaLlamaForCausalLM`` is HF's ``LlamaForCausalLM``: ``lm_head`` and ``model`` (the
  ``LlamaModel``: ``embed_tokens``, ``layers.N.*``, ``norm``). ``model`` is also a
  ``LlavaMetaModel``, so it holds ``vision_tower`` (``CLIPVisionTower``, whose own ``.vision_tower``
  is HF's ``CLIPVisionModel``; in transformers 4.x that has a ``.vision_model`` level) and
  ``mm_projector`` (``nn.Sequential`` ``0``/``2`` for ``mlp2x_gelu``, a bare ``nn.Linear`` for
  ``linear``: ``multimodal_projector/builder.py``).
- ``moe_lora.MoE_LoRA_CLIP`` replaces every CLIP layer's ``mlp``: it keeps the original
  ``CLIPMLP`` as ``original_module`` (``fc1``/``fc2``) and adds ``router`` (``nn.Linear``) and two
  ``ModuleList``s of ``LoRALayer`` (``lora_A``/``lora_B``, both ``nn.Linear`` with biases):
  ``moe_down[e]`` is expert e's LoRA on fc1 (hidden -> intermediate), ``moe_up[e]`` on fc2.
- The adapters are attributes of the top-level model (``initialize_teachers``):
  ``<teacher>_adapter_1`` (channels, our ``channel_proj``) and ``<teacher>_adapter_2`` (tokens, our
  ``token_proj``) for ``sam``, ``eva``, ``pix2struct``, ``convnext``. The teachers themselves sit in a
  plain dict, so a checkpoint holds none of their weights.

This project stacks a LoRA's E experts (``student.mole.RoutedLoRA``), so one project tensor takes
several released ones: expert e of ``moe_down`` is rows ``e*r:(e+1)*r`` of ``lora_fc1.A`` and
``a_bias``, columns ``e*r:(e+1)*r`` of ``lora_fc1.B`` and row e of ``b_bias``. A released key
therefore maps to a ``(project key, Slot)`` pair. ``RULES`` is the whole map, written once and used
in both directions (loading: released -> project; exporting: project -> released); its order
matters (the first matching rule wins, the catch-alls come last).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# The released code names an adapter by its teacher, always one of these; project teacher names
# are the same words (``jobs/configs``: sam, eva, convnext).
RELEASED_TEACHERS = ("sam", "eva", "pix2struct", "convnext")
SLOT_KINDS = ("all", "rows", "cols", "row")

_V = "model.vision_tower.vision_tower.vision_model"  # released CLIP (transformers 4.x vision_model level)
_P = "llava.vision_tower"  # project CLIP (HF CLIPVisionModel of transformers 5: no vision_model level)
_MLP_R = _V + ".encoder.layers.{layer}.mlp"
_MLP_P = _P + ".encoder.layers.{layer}.mlp"
_FIELDS = {
    "layer": r"\d+",
    "e": r"\d+",
    "i": r"\d+",
    "fc": r"fc1|fc2",
    "wb": r"weight|bias",
    "rest": r".+",
}


@dataclass(frozen=True)
class Slot:
    """Where a released tensor sits inside its project tensor.

    ``all``: the whole tensor; for expert ``index`` of rank ``rank``: ``rows`` = rows
    ``index*rank:(index+1)*rank`` (LoRA A and its bias), ``cols`` = those columns (LoRA B),
    ``row`` = row ``index`` (B's bias, stored ``[E, out]``)."""

    kind: str = "all"
    index: int = 0
    rank: int = 0

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.kind == "all":
            return tensor
        if self.kind == "row":
            return tensor[self.index]
        span = slice(self.index * self.rank, (self.index + 1) * self.rank)
        return tensor[span] if self.kind == "rows" else tensor[:, span]


@dataclass(frozen=True)
class Rule:
    """One line of the key map: a released key template <-> a project key template.

    Templates use ``{field}`` placeholders (``_FIELDS`` gives their patterns); ``slot`` is the
    ``Slot`` kind (the expert index is the released template's ``{e}``)."""

    released: str
    project: str
    slot: str = "all"

    def _regex(self, template: str) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", template)
        out = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts))
        return re.compile(f"^{out}$")

    def forward(self, key: str, rank: int) -> tuple[str, Slot] | None:
        m = self._regex(self.released).match(key)
        if m is None:
            return None
        fields = m.groupdict()
        index = int(fields.pop("e", 0))
        return self.project.format(**fields), Slot(self.slot, index, rank if self.slot != "all" else 0)

    def inverse(self, key: str, num_experts: int, rank: int) -> list[tuple[str, Slot]] | None:
        m = self._regex(self.project).match(key)
        if m is None:
            return None
        fields = m.groupdict()
        if self.slot == "all":
            return [(self.released.format(**fields), Slot())]
        return [(self.released.format(e=e, **fields), Slot(self.slot, e, rank)) for e in range(num_experts)]


def _mole_rules() -> list[Rule]:
    rules = [
        Rule(f"{_MLP_R}.original_module.{{fc}}.{{wb}}", f"{_MLP_P}.{{fc}}.{{wb}}"),
        Rule(f"{_MLP_R}.router.{{wb}}", f"{_MLP_P}.router.{{wb}}"),
    ]
    for released, project in (("moe_down", "lora_fc1"), ("moe_up", "lora_fc2")):
        r, p = f"{_MLP_R}.{released}.{{e}}", f"{_MLP_P}.{project}"
        rules += [
            Rule(f"{r}.lora_A.weight", f"{p}.A", "rows"),
            Rule(f"{r}.lora_A.bias", f"{p}.a_bias", "rows"),
            Rule(f"{r}.lora_B.weight", f"{p}.B", "cols"),
            Rule(f"{r}.lora_B.bias", f"{p}.b_bias", "row"),
        ]
    return rules


def build_rules(projector: str, teachers: Iterable[str] = RELEASED_TEACHERS) -> tuple[Rule, ...]:
    """The key map for a checkpoint with this ``mm_projector_type`` and these adapter teachers."""
    if projector == "linear":  # build_vision_projector returns a bare nn.Linear
        proj = [Rule("model.mm_projector.{wb}", "llava.projector.0.{wb}")]
    else:  # mlpNx_gelu: nn.Sequential, Linear at even indices, as our Projector
        proj = [Rule("model.mm_projector.{i}.{wb}", "llava.projector.{i}.{wb}")]
    adapters = []
    for t in teachers:
        adapters += [
            Rule(f"{t}_adapter_1.{{wb}}", f"adapters.{t}.channel_proj.{{wb}}"),
            Rule(f"{t}_adapter_2.{{wb}}", f"adapters.{t}.token_proj.{{wb}}"),
        ]
    return (
        *_mole_rules(),
        Rule(f"{_V}.{{rest}}", f"{_P}.{{rest}}"),  # embeddings, pre_layrnorm, attention, norms, post_layernorm
        *proj,
        *adapters,
        Rule("lm_head.weight", "llava.llm.lm_head.weight"),
        Rule("model.{rest}", "llava.llm.model.{rest}"),  # embed_tokens, layers.N.*, norm
    )


# Buffers older transformers saved and this model recomputes; skipped on load, reported.
IGNORED = (
    re.compile(r"^" + re.escape(_V) + r"\.embeddings\.position_ids$"),
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
)


def is_ignored(key: str) -> bool:
    return any(p.match(key) for p in IGNORED)


def map_released_key(key: str, rules: Iterable[Rule], rank: int) -> tuple[str, Slot] | None:
    """Released key -> (project key, slot), or None when no rule names it."""
    for rule in rules:
        hit = rule.forward(key, rank)
        if hit is not None:
            return hit
    return None


def project_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` once (tied weights under their first name)."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def released_key_map(
    tensors: Mapping[str, torch.Tensor], rules: Iterable[Rule], num_experts: int, rank: int
) -> dict[str, tuple[str, Slot]]:
    """Released key -> (project key, slot) for every project tensor; a project tensor the released
    layout has no place for is an error naming it."""
    rules = tuple(rules)
    out, homeless = {}, []
    for name in tensors:
        for rule in rules:
            hits = rule.inverse(name, num_experts, rank)
            if hits is not None:
                out.update({key: (name, slot) for key, slot in hits})
                break
        else:
            homeless.append(name)
    if homeless:
        raise ValueError(f"these student tensors have no place in the released MoVE-KD layout: {homeless[:8]}")
    return out
