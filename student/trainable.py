"""Which student parameters train in which stage (docs/method.md §7), by name category.

Every parameter of a ``DistillModel`` falls in exactly one category:

- ``mole``: routers and LoRA experts of the MoLE layers (new modules);
- ``vision_base``: the original CLIP weights (embeddings, attention, norms, the wrapped fc1/fc2);
- ``projector``, ``adapters`` (new modules) and ``llm``;
- ``dead``: parameters no loss can reach, whatever the stage.

Stage 1 trains ``mole + projector + adapters``; stage 2 adds ``llm`` and, when
``tune_vision_base`` (the released ``--tune_all``; see ``student.config``), ``vision_base``.

Decision on dead parameters: LLaVA reads ``hidden_states[-2]``, so the last CLIP layer's MLP
(base fc1/fc2 and its LoRA experts) and ``post_layernorm`` never get a gradient. The last layer's
router, attention and norms DO (the balance loss averages the routing of every MoLE layer, and
the router's input is that layer's LN2 output), so they stay live. Rather than
``find_unused_parameters=True`` (an extra autograd traversal every step in DDP) the dead set is
frozen: in the released code those tensors have ``grad=None`` and AdamW skips them, so freezing
changes no trajectory, and their optimizer state is not allocated. A test checks this rule
against autograd (every live parameter gets a gradient, every dead one none).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from student.mole import MoLEMLP, mole_modules

CATEGORIES = ("mole", "vision_base", "projector", "adapters", "llm", "dead")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_MOLE_PART = re.compile(r"\.mlp\.(router|lora_fc1|lora_fc2)\.")
_MLP_PART = re.compile(r"\.mlp\.(fc1|fc2|lora_fc1|lora_fc2)\.")
VISION, PROJECTOR, LLM, ADAPTERS = "llava.vision_tower.", "llava.projector.", "llava.llm.", "adapters."


def trainable_categories(stage: str, tune_vision_base: bool) -> frozenset[str]:
    """The categories that train in ``stage``."""
    if stage == "pretrain":
        if tune_vision_base:
            raise ValueError("tune_vision_base is a finetune option (stage 1 keeps the base CLIP frozen)")
        return frozenset({"mole", "projector", "adapters"})
    if stage == "finetune":
        return frozenset({"mole", "projector", "adapters", "llm"} | ({"vision_base"} if tune_vision_base else set()))
    raise ValueError(f"unknown stage {stage!r}; use 'pretrain' or 'finetune'")


def _first_unread_layer(num_layers: int, vision_layer: int) -> int:
    """Index of the first encoder layer after the hidden state LLaVA reads.

    ``hidden_states`` has ``num_layers + 1`` entries; entry h is the output of layer h - 1."""
    h = vision_layer if vision_layer >= 0 else num_layers + 1 + vision_layer
    if not 0 <= h <= num_layers:
        raise ValueError(f"vision_layer {vision_layer} is outside the tower's {num_layers + 1} hidden states")
    return h


def _is_dead_vision(name: str, first_unread: int, mole_layers: set[int]) -> bool:
    """Liveness of a vision parameter (``name`` relative to the tower)."""
    if name.startswith("post_layernorm.") or ".post_layernorm." in name:
        return True
    match = _LAYER.search(name)
    if match is None or int(match.group(1)) < first_unread:
        return False
    i = int(match.group(1))
    later_router = any(j > i for j in mole_layers)  # reads this layer's output through its LN2
    if _MLP_PART.search(name):
        return not later_router
    if ".mlp.router." in name:
        return i not in mole_layers
    return not (later_router or i in mole_layers)  # attention and norms feed this layer's router


def parameter_categories(model: nn.Module) -> dict[str, str]:
    """``{parameter name: category}`` for every parameter of a ``DistillModel``."""
    tower = model.llava.vision_tower
    layers = sum(1 for n, _ in tower.named_modules() if re.fullmatch(r"(.*\.)?encoder\.layers\.\d+", n))
    first_unread = _first_unread_layer(layers, model.llava.vision_layer)
    mole_layers = {m.layer_index for m in mole_modules(tower)}
    out = {}
    for name, _ in model.named_parameters():
        out[name] = _category(name, first_unread, mole_layers)
    return out


def _category(name: str, first_unread: int, mole_layers: set[int]) -> str:
    if name.startswith(VISION):
        rel = name[len(VISION) :]
        if _is_dead_vision(rel, first_unread, mole_layers):
            return "dead"
        return "mole" if _MOLE_PART.search(rel) else "vision_base"
    for prefix, category in ((PROJECTOR, "projector"), (LLM, "llm"), (ADAPTERS, "adapters")):
        if name.startswith(prefix):
            return category
    raise ValueError(f"parameter {name!r} is outside llava.vision_tower/projector/llm and adapters")


def set_trainable(model: nn.Module, stage: str, tune_vision_base: bool = False) -> dict[str, int]:
    """Set ``requires_grad`` per docs/method.md §7; returns trainable element counts by category."""
    chosen = trainable_categories(stage, tune_vision_base)
    categories = parameter_categories(model)
    counts = dict.fromkeys(sorted(chosen), 0)
    for name, p in model.named_parameters():
        train = categories[name] in chosen
        p.requires_grad_(train)
        if train:
            counts[categories[name]] += p.numel()
    return counts


def names_by_category(model: nn.Module, only: Iterable[str] | None = None) -> dict[str, set[str]]:
    """``{category: {parameter names}}``, optionally restricted to ``only``."""
    out: dict[str, set[str]] = {c: set() for c in CATEGORIES}
    for name, category in parameter_categories(model).items():
        out[category].add(name)
    return {c: out[c] for c in (only or CATEGORIES)}


def new_module_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that do not come from the pretrained CLIP/LLM files (MoLE, projector, adapters):
    always saved in checkpoints and exports, whether trainable or not."""
    mole_prefixes = tuple(
        f"{VISION}{n}.{part}."
        for n, m in model.llava.vision_tower.named_modules()
        if isinstance(m, MoLEMLP)
        for part in ("router", "lora_fc1", "lora_fc2")
    )
    return {
        name
        for name, _ in model.named_parameters()
        if name.startswith((PROJECTOR, ADAPTERS)) or name.startswith(mole_prefixes)
    }
