"""Mixture of LoRA Experts (MoLE) in the MLPs of an HF CLIP vision encoder (docs/method.md §5).

``add_mole(model, cfg)`` swaps ``encoder.layers[i].mlp`` (HF ``CLIPMLP``: fc1 -> act -> fc2) for a
``MoLEMLP`` that keeps the original ``fc1``/``fc2`` modules (same objects, same state_dict keys) and
adds, per layer, a router ``Linear(hidden -> E)`` and E experts. Expert e is a LoRA on fc1
(hidden -> r -> intermediate) plus a LoRA on fc2 (intermediate -> r -> hidden), both picked by one
top-1 routing decision per token (CLS included), computed from the MLP's input (= the LN2 output).

Decisions:
- Released behaviour by default: A and B both kaiming-uniform (``nonlinearity='relu'``), LoRA
  Linears with biases initialised to zero (the released ``LoRALayer`` is two ``nn.Linear``), scale
  alpha/rank applied to the whole LoRA output, dropout on each LoRA's input, the expert output is
  NOT multiplied by its gate (so the router learns only from the balance loss). ``init="lora"``
  is peft's choice (A kaiming with a=sqrt(5), B and biases zero): the model then starts exactly as
  the original CLIP. ``gate_scaling=True`` multiplies the chosen expert by its gate probability.
- Vectorised as "all experts in rank space, masked": the E experts' A matrices are stacked into
  one ``[E*r, in]`` matrix and the B matrices into one ``[out, E*r]``; the rank activations of
  non-chosen experts are zeroed by the one-hot gate between the two matmuls. That is exactly a
  loop over experts with masks, fused into two dense matmuls: no data-dependent shapes, no host
  sync (the released ``torch.where`` gather/scatter syncs), friendly to torch.compile and
  checkpointing. It spends the (small) FLOPs of the unchosen experts: about 12 % of the MLP's
  FLOPs at r=32, E=3 on ViT-L, versus about 4 % for a sparse gather. Unchosen experts get exact
  zero gradients (not None), so DDP sees every expert used.
- Balance loss exactly as docs/method.md §5: L = mean_b sum_e Pbar_{b,e} f_{b,e} over (layers x tokens),
  with no extra factor E (the Switch-Transformer form multiplies by E; the released code does
  not, so a perfectly balanced router gives 1/E, not 1). Each ``MoLEMLP`` records per-sample
  token means ``[B, E]`` of its probabilities (with grad) and of its one-hot choices (detached) on
  every forward; a forward pre-hook on the root model clears them, so stats always come from the
  latest forward (a layer recomputed by gradient checkpointing just overwrites its own record).
- Freezing: the wrapped fc1/fc2 (the original tensors, not copies) are always frozen: the LoRA
  experts are their trainable delta, as released. ``freeze_base=True`` (default) also freezes every
  other parameter of the given model (attention, norms, embeddings); ``freeze_base=False`` leaves
  those flags untouched for recipes that tune more of the student. Router/LoRA are trainable.
- Why not peft: peft's LoRA attaches one adapter (or a per-sample / per-batch choice among named
  adapters) to a Linear; it has no per-token router mixing experts, and here two different
  Linears must share one routing decision. peft stays the right tool for the LLM's LoRA elsewhere.
- Checkpoints: plain ``state_dict``; rebuild with ``add_mole`` (same config), then load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cache.strict import from_mapping

INITS = ("released", "lora")


@dataclass(frozen=True)
class MoLEConfig:
    """MoLE hyper-parameters; defaults are the released MoVE-KD values."""

    layers: tuple[int, ...] | None = None  # encoder layer indices; None = all
    num_experts: int = 3
    rank: int = 32
    alpha: float = 1.0  # LoRA scale = alpha / rank
    dropout: float = 0.05
    init: str = "released"
    gate_scaling: bool = False
    balance_weight: float = 0.01
    lora_bias: bool = True  # released LoRA layers are nn.Linear with (zero-init) biases

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"MoLEConfig.layers has duplicates: {self.layers}")
        if self.num_experts < 1:
            raise ValueError(f"MoLEConfig.num_experts must be >= 1, got {self.num_experts}")
        if self.rank < 1:
            raise ValueError(f"MoLEConfig.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"MoLEConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLEConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"MoLEConfig.init must be one of {INITS}, got {self.init!r}")
        if self.balance_weight < 0:
            raise ValueError(f"MoLEConfig.balance_weight must be >= 0, got {self.balance_weight}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoLEConfig:
        return from_mapping(cls, d)


class RoutedLoRA(nn.Module):
    """E LoRA experts for one Linear, stored stacked: expert e owns rows ``e*r:(e+1)*r`` of ``A``
    (and of ``a_bias``), columns ``e*r:(e+1)*r`` of ``B`` and row e of ``b_bias``.

    ``forward(x, gate)`` returns ``scaling * sum_e gate_e * (B_e (A_e drop(x) + a_e) + b_e)``.
    """

    def __init__(self, in_features: int, out_features: int, cfg: MoLEConfig, factory: dict) -> None:
        super().__init__()
        e, r = cfg.num_experts, cfg.rank
        self.num_experts, self.rank, self.scaling = e, r, cfg.scaling
        self.A = nn.Parameter(torch.empty(e * r, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, e * r, **factory))
        self.a_bias = nn.Parameter(torch.zeros(e * r, **factory)) if cfg.lora_bias else None
        self.b_bias = nn.Parameter(torch.zeros(e, out_features, **factory)) if cfg.lora_bias else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters(cfg.init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        r = self.rank
        for e in range(self.num_experts):  # per-expert views so fan_in is the expert's own
            a, b = self.A[e * r : (e + 1) * r], self.B[:, e * r : (e + 1) * r]
            if init == "released":
                nn.init.kaiming_uniform_(a, nonlinearity="relu")
                nn.init.kaiming_uniform_(b, nonlinearity="relu")
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
        for bias in (self.a_bias, self.b_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.A, self.a_bias)  # [..., E*r]
        h = (h.unflatten(-1, (self.num_experts, self.rank)) * gate.unsqueeze(-1)).flatten(-2)
        out = F.linear(h, self.B)
        if self.b_bias is not None:
            out = out + gate @ self.b_bias
        return out * self.scaling


class MoLEMLP(nn.Module):
    """Drop-in replacement for HF ``CLIPMLP`` with a top-1 routed mixture of LoRA experts."""

    def __init__(self, mlp: nn.Module, cfg: MoLEConfig, layer_index: int) -> None:
        super().__init__()
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
            raise ValueError(f"layer {layer_index}: mlp has no fc1/fc2 nn.Linear (got {type(mlp).__name__})")
        if fc1.out_features != fc2.in_features or fc1.in_features != fc2.out_features:
            raise ValueError(
                f"layer {layer_index}: fc1 {tuple(fc1.weight.shape)} and fc2 "
                f"{tuple(fc2.weight.shape)} do not form a hidden->inter->hidden MLP"
            )
        factory = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
        self.cfg, self.layer_index = cfg, layer_index
        self.fc1, self.fc2, self.activation_fn = fc1, fc2, mlp.activation_fn
        self.router = nn.Linear(fc1.in_features, cfg.num_experts, **factory)
        self.lora_fc1 = RoutedLoRA(fc1.in_features, fc1.out_features, cfg, factory)
        self.lora_fc2 = RoutedLoRA(fc2.in_features, fc2.out_features, cfg, factory)
        self.last_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def mole_parameters(self) -> Iterator[nn.Parameter]:
        for module in (self.router, self.lora_fc1, self.lora_fc2):
            yield from module.parameters()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (float32) and top-1 one-hot choices, both ``[..., E]``."""
        probs = self.router(x).float().softmax(dim=-1)
        onehot = F.one_hot(probs.argmax(dim=-1), self.cfg.num_experts).to(probs.dtype)
        return probs, onehot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"MoLEMLP expects [batch, tokens, hidden], got shape {tuple(x.shape)}")
        probs, onehot = self.route(x)
        self.last_stats = (probs.mean(dim=1), onehot.mean(dim=1).detach())
        gate = (onehot * probs if self.cfg.gate_scaling else onehot).to(x.dtype)
        h = self.activation_fn(self.fc1(x) + self.lora_fc1(x, gate))
        return self.fc2(h) + self.lora_fc2(h, gate)


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """``encoder.layers`` of a CLIPVisionModel (transformers 5: no ``vision_model`` level),
    CLIPVisionModelWithProjection / transformers-4 CLIPVisionModel (``vision_model.encoder``)."""
    for owner in (model, getattr(model, "vision_model", None)):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"{type(model).__name__} is not an HF CLIP vision model: "
        "found neither .encoder.layers nor .vision_model.encoder.layers"
    )


def _clear_stats_hook(module: nn.Module, args: Any) -> None:
    for m in module.modules():
        if isinstance(m, MoLEMLP):
            m.last_stats = None


def add_mole(model: nn.Module, cfg: MoLEConfig = MoLEConfig(), freeze_base: bool = True) -> nn.Module:
    """Replace the MLP of ``cfg.layers`` (all when None) with ``MoLEMLP``; in place, returns ``model``."""
    layers = _encoder_layers(model)
    if any(isinstance(m, MoLEMLP) for m in model.modules()):
        raise ValueError("this model already carries MoLE layers; call add_mole once per model")
    chosen = range(len(layers)) if cfg.layers is None else cfg.layers
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"MoLEConfig.layers {bad} out of range for a {len(layers)}-layer encoder")
    if freeze_base:
        model.requires_grad_(False)
    for i in chosen:
        layers[i].mlp = MoLEMLP(layers[i].mlp, cfg, layer_index=i).train(layers[i].training)  # keep eval mode
        layers[i].mlp.fc1.requires_grad_(False)
        layers[i].mlp.fc2.requires_grad_(False)
    for p in mole_parameters(model):
        p.requires_grad_(True)
    model.register_forward_pre_hook(_clear_stats_hook)
    return model


def mole_modules(model: nn.Module) -> list[MoLEMLP]:
    return [m for m in model.modules() if isinstance(m, MoLEMLP)]


def mole_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Router and LoRA parameters (not the base fc1/fc2), for the optimizer's param groups."""
    return [p for m in mole_modules(model) for p in m.mole_parameters()]


def _recorded(model: nn.Module) -> list[MoLEMLP]:
    mods = [m for m in mole_modules(model) if m.last_stats is not None]
    if not mods:
        raise ValueError("no MoLE routing recorded: run a forward pass of the MoLE model first")
    batch = {m.last_stats[0].shape for m in mods}
    if len(batch) != 1:
        raise ValueError(f"MoLE layers hold routing stats of different forwards (shapes {batch})")
    return mods


def mole_balance_loss(model: nn.Module) -> torch.Tensor:
    """mean_b sum_e Pbar_{b,e} f_{b,e} over (layers x tokens) of the latest forward (no factor E).

    Every layer sees the same token count, so the mean over layers of per-layer token means is
    the mean over (layers x tokens).
    """
    mods = _recorded(model)
    pbar = torch.stack([m.last_stats[0] for m in mods]).mean(dim=0)  # [B, E]
    frac = torch.stack([m.last_stats[1] for m in mods]).mean(dim=0)  # [B, E], detached
    return (pbar * frac).sum(dim=-1).mean()


def mole_routing_stats(model: nn.Module) -> dict[str, float]:
    """Batch-mean fraction of tokens per expert per layer: ``mole/layer03/expert1`` -> 0.41.

    One host sync for all layers (stacked, then ``tolist``).
    """
    mods = _recorded(model)
    fracs = torch.stack([m.last_stats[1].mean(dim=0) for m in mods]).tolist()  # [L, E]
    return {f"mole/layer{m.layer_index:02d}/expert{e}": v for m, row in zip(mods, fracs) for e, v in enumerate(row)}
