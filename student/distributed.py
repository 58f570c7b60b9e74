"""Process-group context and model wrapping (DDP, or FSDP2 for the LLM) for the trainer.

Decisions:
- Library code never reads environment variables: the jobs layer initialises the process group
  from torchrun's env and passes ``rank``/``world_size``/``device`` here explicitly.
  ``DistContext`` only checks that a group is initialised when ``world_size > 1``.
- DDP: ``find_unused_parameters=False`` by default. Parameters no loss reaches (the last CLIP
  layer's MLP/LoRA, ``post_layernorm``) are frozen by ``student.trainable``; unchosen MoLE experts
  get exact zero gradients, not None; LlavaStudent keeps the projector in the graph for all-text
  batches. ``TrainConfig.find_unused_parameters`` remains as an escape hatch.
- FSDP: torch's FSDP2 ``fully_shard`` on every LLM decoder layer, then on the whole
  ``DistillModel`` (the root group holds the vision tower, projector, adapters, embeddings and
  head). bf16 runs use ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` over fp32
  sharded masters. Gradient accumulation uses ``set_requires_gradient_sync(False)`` on the
  non-final micro-batches (DDP: ``no_sync``). Tested on CPU/gloo: the sharded step and the
  full-state checkpoint round trip; mixed precision and CUDA specifics are not CPU-testable.
- Metrics are reduced with one ``all_reduce`` per optimizer step (a stacked vector).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from student.config import TrainConfig


@dataclass(frozen=True)
class DistContext:
    """Who this process is. ``world_size == 1`` needs no process group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "world_size > 1 but no torch.distributed process group is initialised; "
                "the jobs layer must call init_process_group (torchrun env) first"
            )
        if self.world_size > 1 and dist.get_world_size() != self.world_size:
            raise ValueError(f"world_size={self.world_size} but the process group has {dist.get_world_size()}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def _llm_layers(model: nn.Module) -> list[nn.Module]:
    llm = model.llava.llm
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"FSDP: cannot find the decoder layers of {type(llm).__name__} (no .layers ModuleList)")
    return list(layers)


def apply_fsdp(model: nn.Module, ctx: DistContext, bf16: bool) -> nn.Module:
    """Shard each LLM decoder layer, then the rest of the model (in place; returns ``model``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    kwargs = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in _llm_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_model(model: nn.Module, cfg: TrainConfig, ctx: DistContext, bf16: bool) -> nn.Module:
    """The module the loop calls: ``model`` itself (1 process, or FSDP2 in place) or a DDP wrapper."""
    if not ctx.distributed:
        return model
    if cfg.distributed == "fsdp":
        return apply_fsdp(model, ctx, bf16)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)


def grad_sync(module: nn.Module, sync: bool):
    """Context for one micro-batch: skip the gradient all-reduce unless ``sync``."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
