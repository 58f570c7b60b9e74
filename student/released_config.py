"""A released MoVE-KD ``config.json`` <-> this project's settings, field by field.

The released ``config.json`` is the LLM's ``LlamaConfig`` plus LLaVA's fields (written by
``LlavaMetaModel.initialize_vision_modules`` and ``llava/train/train.py``) plus MoVE-KD's ``moe``
and ``kd`` dicts (``MoVELlavaLlamaConfig``). ``parse_released_config`` reads every key: a field
this project can honour is mapped, a training record that changes no weight or forward is
ignored, anything else (an unknown key, or a value this student cannot reproduce, e.g. dense
MoLE routing or ``mm_use_im_start_end``) is a ``ValueError`` naming the field.
``released_config_dict`` writes the same fields back for ``export_llava``; it also writes the
legacy ``rope_theta``/``rope_scaling``/``torch_dtype`` keys the released code's transformers 4.37
reads (transformers 5 writes ``rope_parameters``/``dtype``).

The CLIP tower's own config is not in the file: LLaVA rebuilds it from ``mm_vision_tower`` (a hub
name or folder), and so do we (``load_released(vision_tower=...)`` overrides the source).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import LlamaConfig

MODEL_TYPE, ARCHITECTURE = "move_llava_llama", "MoVELlavaLlamaForCausalLM"
_PROJECTOR = re.compile(r"^(linear|mlp[1-9]\d*x_gelu)$")
_MOE_KEYS = {
    "moe_encoder",
    "moe_encoder_dense",
    "moe_encoder_lora_rank",
    "moe_encoder_lora_alpha",
    "moe_encoder_num_experts",
}
# Records of how the released run trained; no weight or forward depends on them.
_TRAINING_RECORDS = {
    "kd",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "mm_projector_lr",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "mm_vision_tower_lr",
    "mm_use_im_patch_token",  # tokenizer-only: LLaVA-1.5 prompts never insert <im_patch>
    "use_cache",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
}
# transformers 4.x PretrainedConfig generation settings (not model settings: dropped) and 4.x Llama
# keys that transformers 5 still accepts (rope_theta/rope_scaling -> rope_parameters).
_GENERATION = {"max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p"}
_GENERATION |= {"repetition_penalty"}
_LEGACY_LLAMA = {"rope_theta", "rope_scaling"} | _GENERATION


@dataclass(frozen=True)
class ReleasedConfig:
    """What a released ``config.json`` says, in this project's terms."""

    llm: LlamaConfig
    mm_vision_tower: str
    mm_hidden_size: int
    projector: str  # student.llava.Projector kind
    vision_layer: int  # LlavaStudent.vision_layer
    image_aspect_ratio: str  # PreprocessSpec.aspect: "pad" or "square"
    num_experts: int  # MoLEConfig.num_experts
    rank: int  # MoLEConfig.rank
    alpha: float  # MoLEConfig.alpha


def _bad(field: str, value: Any, want: str) -> ValueError:
    return ValueError(f"config.json field {field!r} = {value!r}: {want}")


def _expect(d: Mapping, field: str, allowed: tuple, default: Any, why: str) -> Any:
    value = d.get(field, default)
    if value not in allowed:
        raise _bad(field, value, f"this student supports only {list(allowed)} ({why})")
    return value


def _moe(d: Mapping) -> tuple[int, int, float]:
    moe = d.get("moe")
    if not isinstance(moe, Mapping):
        raise _bad("moe", moe, "a MoVE-KD checkpoint has a 'moe' dict (MoVELlavaLlamaConfig)")
    unknown = sorted(set(moe) - _MOE_KEYS)
    if unknown:
        raise _bad("moe", dict(moe), f"unknown key(s) {unknown}")
    if moe.get("moe_encoder") is not True:
        raise _bad("moe.moe_encoder", moe.get("moe_encoder"), "this student always carries MoLE (needs true)")
    if moe.get("moe_encoder_dense", False) is not False:
        raise _bad("moe.moe_encoder_dense", moe["moe_encoder_dense"], "only sparse top-1 routing is implemented")
    values = []
    for key in ("moe_encoder_num_experts", "moe_encoder_lora_rank", "moe_encoder_lora_alpha"):
        v = moe.get(key)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise _bad(f"moe.{key}", v, "needs a positive number")
        if key != "moe_encoder_lora_alpha" and int(v) != v:
            raise _bad(f"moe.{key}", v, "needs an integer")
        values.append(v)
    return int(values[0]), int(values[1]), float(values[2])


def _llama(d: Mapping, handled: set[str]) -> LlamaConfig:
    rest = {k: v for k, v in d.items() if k not in handled and k not in _TRAINING_RECORDS}
    known = set(LlamaConfig().to_dict()) | _LEGACY_LLAMA
    unknown = sorted(set(rest) - known)
    if unknown:
        raise ValueError(
            f"config.json has field(s) {unknown} that are neither LLaVA/MoVE-KD nor Llama settings; "
            "load_released refuses to guess what they change"
        )
    kwargs = {k: v for k, v in rest.items() if k not in _GENERATION and k != "model_type"}
    return LlamaConfig(**kwargs)


def parse_released_config(d: Mapping[str, Any]) -> ReleasedConfig:
    """Every field of a released ``config.json`` mapped, ignored with a reason, or refused."""
    if d.get("model_type") != MODEL_TYPE:
        raise _bad(
            "model_type",
            d.get("model_type"),
            f"load_released reads MoVE-KD checkpoints ({MODEL_TYPE!r}); a plain LLaVA has no MoLE experts",
        )
    tower = d.get("mm_vision_tower")
    if not isinstance(tower, str) or not tower:
        raise _bad("mm_vision_tower", tower, "needs the CLIP tower's hub name or folder")
    projector = d.get("mm_projector_type", "linear")  # LLaVA's default
    if not isinstance(projector, str) or not _PROJECTOR.match(projector):
        raise _bad("mm_projector_type", projector, "this student has 'linear' or 'mlp<N>x_gelu' projectors")
    layer = d.get("mm_vision_select_layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise _bad("mm_vision_select_layer", layer, "needs an integer hidden-state index (LLaVA-1.5: -2)")
    hidden = d.get("mm_hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        raise _bad("mm_hidden_size", hidden, "needs the CLIP tower's width")
    _expect(d, "mm_vision_select_feature", ("patch",), "patch", "the KD target drops the CLS token")
    _expect(d, "mm_patch_merge_type", ("flat",), "flat", "no anyres/unpad image_newline")
    _expect(d, "use_mm_proj", (True,), True, "the projector is part of the model")
    _expect(d, "mm_use_im_start_end", (False,), False, "no <im_start>/<im_end> tokens around the image")
    _expect(d, "image_grid_pinpoints", (None,), None, "no anyres")
    _expect(d, "s2", (False,), False, "no multi-scale S2 tower")
    aspect = _expect(d, "image_aspect_ratio", ("pad", "square"), "square", "LLaVA-1.5's two modes")
    num_experts, rank, alpha = _moe(d)
    handled = {"model_type", "mm_vision_tower", "mm_projector_type", "mm_vision_select_layer", "mm_hidden_size"}
    handled |= {"mm_vision_select_feature", "mm_patch_merge_type", "use_mm_proj", "mm_use_im_start_end"}
    handled |= {"image_grid_pinpoints", "s2", "image_aspect_ratio", "moe"}
    return ReleasedConfig(_llama(d, handled), tower, hidden, projector, layer, aspect, num_experts, rank, alpha)


def _legacy_rope(rope: Mapping | None) -> dict[str, Any]:
    rope = dict(rope or {})
    theta = rope.pop("rope_theta", 10000.0)
    kind = rope.get("rope_type", "default")
    return {"rope_theta": theta, "rope_scaling": None if kind == "default" else {**rope, "type": kind}}


def released_config_dict(
    llm: LlamaConfig,
    *,
    mm_vision_tower: str,
    mm_hidden_size: int,
    projector: str,
    vision_layer: int,
    image_aspect_ratio: str,
    num_experts: int,
    rank: int,
    alpha: float,
    dtype: str,
    tokenizer_max_length: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a MoVE-KD checkpoint, as ``llava/train/train.py`` would write it."""
    d = llm.to_diff_dict()
    for k in ("architectures", "_name_or_path", "dtype", "torch_dtype", "model_type"):
        d.pop(k, None)
    d.update(_legacy_rope(d.pop("rope_parameters", None)))
    d.update(
        model_type=MODEL_TYPE,
        architectures=[ARCHITECTURE],
        torch_dtype=dtype,
        use_cache=True,
        mm_vision_tower=mm_vision_tower,
        mm_hidden_size=mm_hidden_size,
        mm_projector_type=projector,
        mm_vision_select_layer=vision_layer,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        use_mm_proj=True,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio=image_aspect_ratio,
        tokenizer_padding_side="right",
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        mm_projector_lr=None,
        moe={
            "moe_encoder": True,
            "moe_encoder_dense": False,
            "moe_encoder_lora_rank": rank,
            "moe_encoder_lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "moe_encoder_num_experts": num_experts,
        },
        kd={"kd_mode": True},  # as released checkpoints: EvalMoVELlavaLlamaForCausalLM's generate expects it
    )
    if tokenizer_max_length is not None:
        d["tokenizer_model_max_length"] = tokenizer_max_length
    return d
