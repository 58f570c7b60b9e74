"""The CLIP teacher (docs/method.md §2.2 and §6): patch tokens, CLS state and CLS attention row.

Decisions:
- Tapped tensor: ``hidden_states[layer]`` (default -2, LLaVA's ``mm_vision_select_layer``),
  tokens = ``[:, 1:]``, ``cls_state`` = ``[:, 0]`` (unnormalised: no post_layernorm).
- Indexing: ``hidden_states`` has ``L + 1`` entries (embeddings after ``pre_layrnorm``, then each
  encoder layer's output), so ``hidden_states[i]`` (i >= 1) is the output of ``encoder.layers[i-1]``
  and its input is ``hidden_states[i-1]``. "Layer -2 attention" is the attention inside the layer
  whose output is ``hidden_states[-2]``: ``encoder.layers[L-2]``, fed by ``hidden_states[-3]``, i.e.
  ``attentions[-2]`` of an eager ``output_attentions=True`` run.
- ``cls_attn`` is recomputed from that layer's input instead of running the whole model eagerly:
  ``layer_norm1`` -> ``q_proj`` (the CLS row only) and ``k_proj`` (all keys incl. CLS) -> scaled
  logits -> softmax in fp32 over all keys -> mean over heads -> drop the CLS column. The model itself
  runs with SDPA (or flash attention on CUDA). The row sums to 1 minus the CLS self-attention.
"""

from __future__ import annotations

import torch

from pipeline.teachers.base import NativeOutput, Teacher, TeacherSpec, clip_style_preprocess, with_source
from pipeline.teachers.hf import accepts_kwarg, load_hf
from pipeline.teachers.hf_info import hf_config, square_grid_from_config
from pipeline.teachers.registry import TeacherInfo, make_info, register_info, register_teacher

DEFAULT_SOURCE = "openai/clip-vit-large-patch14-336"
# The released checkpoint's vision config (what --dry-run needs, offline).
KNOWN_CONFIGS = {DEFAULT_SOURCE: dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24)}


def clip_info(spec: TeacherSpec, config) -> TeacherInfo:
    """Outputs of the CLIP teacher ``spec`` with this (vision) config: patch tokens of
    ``hidden_states[layer]``, their [CLS] state and [CLS] attention row."""
    cfg = getattr(config, "vision_config", config)
    layer = -2 if spec.layer is None else spec.layer
    resolution = spec.resolution or int(cfg.image_size)
    grid = square_grid_from_config(resolution, cfg, spec.name)
    pre = clip_style_preprocess(resolution, spec.aspect)
    return make_info(spec, pre, f"hidden_states[{layer}][:, 1:]", grid, int(cfg.hidden_size), has_cls=True)


class ClipTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, device: torch.device):
        cfg = model.config
        layers = _encoder_layers(model)
        layer = -2 if spec.layer is None else spec.layer
        index = layer if layer >= 0 else len(layers) + 1 + layer
        if not 1 <= index <= len(layers):
            raise ValueError(
                f"teacher {spec.name}: layer {layer} is not an encoder layer output "
                f"(hidden_states has {len(layers) + 1} entries; 0 is the embeddings, which have no attention)"
            )
        self.hs_index = index
        self.attn_layer = layers[index - 1]
        info = clip_info(spec, cfg)
        self.patch_grid = info.native_grid
        self.forward_kwargs = {}
        if info.preprocess.resolution != int(cfg.image_size) and accepts_kwarg(model, "interpolate_pos_encoding"):
            self.forward_kwargs["interpolate_pos_encoding"] = True
        super().__init__(
            spec,
            model,
            device,
            info.preprocess,
            layer=info.layer,
            has_cls=True,
            arch_info={"class": type(model).__name__, "model_kwargs": spec.model_kwargs},
        )

    def _forward(self, pixels: torch.Tensor) -> NativeOutput:
        out = self.model(pixel_values=pixels, output_hidden_states=True, **self.forward_kwargs)
        hidden = out.hidden_states[self.hs_index]
        n = self.patch_grid[0] * self.patch_grid[1]
        if hidden.shape[1] != n + 1:
            raise ValueError(f"teacher {self.name}: expected 1 + {n} tokens, got {hidden.shape[1]}")
        cls_attn = clip_cls_attention(self.attn_layer, out.hidden_states[self.hs_index - 1])
        return NativeOutput(tokens=hidden[:, 1:], grid=self.patch_grid, cls_state=hidden[:, 0], cls_attn=cls_attn)


def clip_cls_attention(layer: torch.nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """[B, T, D] input of a CLIPEncoderLayer -> [B, T-1] head-mean CLS attention over patch keys."""
    attn = layer.self_attn
    h = layer.layer_norm1(layer_input)
    b, t, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(h[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, heads, head_dim).transpose(1, 2)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale  # [B, H, 1, T]
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=1)[:, 0, 1:]


def _encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "vision_model", model)  # transformers 4 nests a CLIPVisionTransformer
    return inner.encoder.layers


@register_teacher("clip")
def build_clip(spec: TeacherSpec, device: torch.device) -> Teacher:
    from transformers import CLIPVisionModel

    spec = with_source(spec, DEFAULT_SOURCE)
    model = load_hf(CLIPVisionModel, spec, device)
    return ClipTeacher(spec, model, device)


@register_info("clip")
def describe_clip(spec: TeacherSpec) -> TeacherInfo:
    spec = with_source(spec, DEFAULT_SOURCE)
    return clip_info(spec, hf_config(spec, KNOWN_CONFIGS))
