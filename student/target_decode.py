"""Teacher targets decoded on the training device: torch decoders for the cache codecs.

With ``target_decode: device`` the DataLoader hands over the cache's stored components (int8
levels + scales, bf16 bits, packed int4 nibbles + float16 scales...) instead of float32 targets:
4x fewer bytes to build, copy between processes, pin and move (about 7.9 MB instead of 31.7 MB
per sample at the v1.0 shapes), and the dequantisation runs on the GPU after the copy.

``decode_targets(codec, parts, device)`` returns exactly what ``get_codec(codec).decode(parts)``
returns (float32, same bits), on ``device``. The numpy codecs (``cache.codecs``) stay the
specification; cache/ has no torch and student/ cannot import pipeline/'s encoders, so the
decoders live here, mirroring numpy operation by operation (as ``pipeline/torch_codecs.py``
mirrors the encoders). Decisions:

- Every step is exact in IEEE arithmetic, so no ordering or rounding-mode question arises:
  int8/int4 levels -> float32 are exact, float16 -> float32 is exact, and the one multiply per
  value (level x float32 scale) is a single correctly rounded IEEE product on CPU and CUDA (no
  fast-math/FTZ builds; ``torch.set_flush_denormal(True)`` would break subnormal scales on CPU).
- bf16 bits -> float32 is integer work: the uint16 bits are reinterpreted as int16 (no uint16
  kernel is needed on the device), widened to int32 and shifted left by 16, then viewed as
  float32, numpy's ``bits.astype(uint32) << 16``. Sign-extension only fills bits the shift drops.
- int4 nibbles are sign-extended as ``(nibble ^ 8) - 8``, numpy's ``(n << 4) >> 4`` on int8,
  without relying on a signed shift's behaviour on the device.
- A codec with no torch decoder falls back to the numpy decode on the host (one log line per
  name), then moves the float32 result: a new numpy preset never breaks training.
- ``decode_batch_targets`` turns a batch's ``encoded_targets`` ({teacher: {"codec", "parts"}}, as
  ``student.data.collate_distill`` stacks them) into ``targets`` after the batch is on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from cache.codecs import get_codec

log = logging.getLogger(__name__)

Decoder = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
ENCODED_KEY = "encoded_targets"  # the batch key of the stored components (student.data)

_DECODERS: dict[str, Decoder] = {}
_FELL_BACK: set[str] = set()


def register_torch_decoder(name: str) -> Callable[[Decoder], Decoder]:
    """Decorator: ``dec(parts) -> float32 tensor`` for the numpy preset ``name``; ``parts`` are the
    stored components as tensors on the target device (``[B, *component shape]``)."""

    def deco(dec: Decoder) -> Decoder:
        if name in _DECODERS:
            raise ValueError(f"torch decoder {name!r} is already registered")
        _DECODERS[name] = dec
        return dec

    return deco


def has_torch_decoder(name: str) -> bool:
    return name in _DECODERS


def parts_to_torch(parts: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Stored numpy components -> CPU tensors sharing their memory (uint16 stays uint16)."""
    return {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in parts.items()}


def decode_targets(codec: str, parts: Mapping[str, torch.Tensor | np.ndarray], device=None) -> torch.Tensor:
    """float32 targets of codec ``codec`` from its components, on ``device`` (default: where the
    parts are), bit-identical to ``get_codec(codec).decode(parts)``."""
    get_codec(codec)  # an unknown name fails with the codec registry's message
    tensors = {k: v for k, v in parts.items() if isinstance(v, torch.Tensor)}
    tensors.update(parts_to_torch({k: v for k, v in parts.items() if k not in tensors}))
    if device is None:
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    dec = _DECODERS.get(codec)
    if dec is None:
        if codec not in _FELL_BACK:
            _FELL_BACK.add(codec)
            log.warning("codec %s has no torch decoder; decoding its targets with numpy on the host", codec)
        host = get_codec(codec).decode({k: v.cpu().numpy() for k, v in tensors.items()})
        return torch.from_numpy(host).to(device)
    with torch.no_grad():
        return dec({k: v.to(device, non_blocking=True) for k, v in tensors.items()})


def decode_batch_targets(batch: dict[str, Any], device=None) -> dict[str, Any]:
    """``batch`` with its ``encoded_targets`` decoded into ``targets`` (float32 ``[B, N, C]`` per
    teacher, on ``device`` or where the parts are); a batch without them is returned unchanged."""
    encoded = batch.get(ENCODED_KEY)
    if encoded is None:
        return batch
    out = {k: v for k, v in batch.items() if k != ENCODED_KEY}
    decoded = {t: decode_targets(e["codec"], e["parts"], device) for t, e in encoded.items()}
    out["targets"] = {**out.get("targets", {}), **decoded}
    return out


# -- the presets ----------------------------------------------------------------------------


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer. On the CPU it is numpy-allocated: numpy asks the kernel for transparent
    huge pages on large buffers and torch's allocator does not, which made first-touching a batch
    of v1.0 targets (0.5 GB) about 3x slower (bench_loading.py's decode figure)."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty(tuple(shape), dtype=str(dtype).removeprefix("torch.")))
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@register_torch_decoder("bf16")
def _dec_bf16(p):
    bits = p["values"]
    if bits.dtype == torch.uint16:
        bits = bits.view(torch.int16)
    out = _empty(bits.shape, torch.int32, bits.device).copy_(bits)
    return out.bitwise_left_shift_(16).view(torch.float32)


@register_torch_decoder("fp16")
def _dec_fp16(p):
    v = p["values"]
    return _empty(v.shape, torch.float32, v.device).copy_(v)


def _dec_int8(p):
    # int8 -> float32 copy, then a float32 multiply in place: a mixed-dtype multiply computes the
    # same products but takes torch's slow dynamic-cast path on the CPU (3.5x slower measured)
    v = p["values"]
    return _empty(v.shape, torch.float32, v.device).copy_(v).mul_(p["scale"].to(torch.float32))


for _name in ("int8", "int8_channel", "ecsq"):
    register_torch_decoder(_name)(_dec_int8)


def _dec_int4(p):
    packed, scale = p["values"], p["scale"].to(torch.float32)
    b, n, half = packed.shape
    nib = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(b, n, half * 2)
    q = _empty(nib.shape, torch.float32, nib.device).copy_(nib ^ 8).sub_(8.0)  # 4-bit two's complement, exact
    groups = scale.shape[-1]  # explicit group size: reshape(..., -1) fails for an empty batch
    return q.view(b, n, groups, half * 2 // groups).mul_(scale[..., None]).view(b, n, half * 2)


for _name in ("int4", "int4_g64"):
    register_torch_decoder(_name)(_dec_int4)


__all__ = [
    "ENCODED_KEY",
    "decode_batch_targets",
    "decode_targets",
    "has_torch_decoder",
    "parts_to_torch",
    "register_torch_decoder",
]
