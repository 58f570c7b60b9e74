"""The cache codecs (``cache.codecs``) re-implemented with torch ops, so features are quantised
on the device that produced them and only the small encoded arrays cross to the host.

``encode_torch(name, x)`` returns exactly what ``get_codec(name).encode(x.float().cpu().numpy())``
returns: same components, dtypes, shapes and bits. The numpy codecs stay the specification
(cache/ never imports torch); this file mirrors them operation by operation. Decisions:

- One host sync for all checks. The NaN/Inf row mask and every range check (bf16 overflow, fp16
  range, scale overflow) are computed on the device as flags and read back in one transfer;
  only then are the components copied. NaN/Inf raise ``NonFiniteError(rows)`` first, like numpy.
- Scales follow numpy exactly: ``absmax`` in float32 (a max is exact in any order), the
  division by ``qmax + 0.5`` in float64, then rounded *up* to the storage dtype. float64 on a
  GPU only touches the per-token/per-group scale vectors (``B*N`` or ``B*N*C/g`` elements), not
  the features, so its slow rate on consumer GPUs does not matter (``ecsq`` is the exception,
  below).
- Divisors are device tensors, never Python scalars: CUDA's ``div`` turns ``a / cpu_scalar``
  into ``a * (1 / scalar)``, which can differ from IEEE division by one ulp (torch's
  BinaryDivTrueKernel.cu says so); a 0-dim tensor on the same device takes the true-division
  path. CPU torch always divides, so the CPU tests cannot catch a regression here.
- ``|x|.max`` is ``max(max x, -min x)`` (no ``|x|`` temporary) and doubles as the NaN/Inf
  check: both reductions propagate NaN, so no separate full pass of ``isfinite``.
- float64 -> float16 in torch rounds twice (via float32; numpy rounds once), so the converted
  scale can be the other neighbour of a float16 midpoint. Harmless here: "convert, then step
  up if below" always yields the smallest float16 >= the exact scale, from either neighbour
  (tested). bf16/fp16 casts (``.to``) are IEEE round-to-nearest-even on CPU and CUDA, subnormals
  kept (PyTorch builds without fast-math/FTZ); ``torch.set_flush_denormal(True)`` would break
  bit-equality for subnormal inputs on CPU.
- ``ecsq`` needs ``sum(x**2)`` in float64, whose rounding depends on the summation order (a
  plain ``torch.sum`` differs from ``np.sum`` in the last bit for about half of the tokens);
  ``numpy_sum_lastdim`` reproduces numpy's pairwise order exactly (checked against ``np.sum``
  in the tests), so the level count matches even when ``absmax / (0.4 rms)`` is an integer to
  float64 precision. It is the one preset with float64 work over every feature (about 5 passes
  over a float64 copy, in row chunks of at most 128 MiB): fine on datacentre GPUs, slower on
  consumer ones (1/64-rate float64), where the adds should still be memory-bound (one flop per 8 bytes read).
- A registry keyed by codec name; a preset with no torch encoder falls back to the numpy codec
  (one log line per name), so a new numpy preset never breaks extraction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from cache import codecs as np_codecs
from cache.codecs import NonFiniteError, get_codec

log = logging.getLogger(__name__)

Check = tuple[torch.Tensor, str]  # (0-dim bool on the device: True = error, the error's message)
Encoder = Callable[[torch.Tensor, list], dict[str, torch.Tensor]]

_ENCODERS: dict[str, Encoder] = {}
_FELL_BACK: set[str] = set()
_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE: leaves of its pairwise summation
_ECSQ_CHUNK = 1 << 24  # float64 elements per ecsq row chunk (128 MiB)


def register_torch_encoder(name: str) -> Callable[[Encoder], Encoder]:
    """Decorator: ``enc(x, checks) -> {component: tensor}`` for the numpy preset ``name``; ``x``
    is finite-or-not float32 ``[B, N, C]``; deferred range errors go to ``checks``."""

    def deco(enc: Encoder) -> Encoder:
        if name in _ENCODERS:
            raise ValueError(f"torch encoder {name!r} is already registered")
        _ENCODERS[name] = enc
        return enc

    return deco


def has_torch_encoder(name: str) -> bool:
    return name in _ENCODERS


def encode_torch(codec_name: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Encode ``x`` ``[B, N, C]`` (any float dtype, any device) with preset ``codec_name`` on
    ``x``'s device; returns host numpy components bit-identical to the numpy codec's on
    ``x.float()``. Raises ``NonFiniteError`` (batch rows) for NaN/Inf and ``ValueError`` with the
    numpy codec's message for out-of-range values or shapes."""
    codec = get_codec(codec_name)
    if x.ndim != 3:
        raise ValueError(f"codec {codec_name}: expected [batch, tokens, channels], got shape {tuple(x.shape)}")
    enc = _ENCODERS.get(codec_name)
    if enc is None or x.numel() == 0:  # empty: nothing to move, and numpy's edge cases for free
        if enc is None and codec_name not in _FELL_BACK:
            _FELL_BACK.add(codec_name)
            log.warning("codec %s has no torch encoder; encoding it with numpy on the host", codec_name)
        return codec.encode(x.detach().float().cpu().numpy())
    with torch.inference_mode():
        x = x.detach().float()
        checks: list[Check] = []
        bad_rows = ~torch.isfinite(abs_max(x, 2)).flatten(1).all(dim=1)  # NaN/Inf propagate into it
        parts = enc(x, checks)
        flags = torch.cat([bad_rows, *(flag.reshape(1) for flag, _ in checks)]).cpu()  # the host sync
        rows = torch.nonzero(flags[: x.shape[0]]).flatten().tolist()
        if rows:
            raise NonFiniteError(rows)
        for (_, message), failed in zip(checks, flags[x.shape[0] :].tolist()):
            if failed:
                raise ValueError(message)
        return {name: _to_host(part) for name, part in parts.items()}


# -- helpers --------------------------------------------------------------------------------


def _const(value: float, like: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A 0-dim tensor on ``like``'s device (see the module docstring: never divide by a scalar).
    ``torch.full`` is a fill kernel; ``torch.tensor(v, device="cuda")`` would copy from the host
    and wait for the stream, an extra sync."""
    return torch.full((), value, dtype=dtype, device=like.device)


def abs_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``|x|.max(dim, keepdim)`` as ``max(max x, -min x)``: two reductions, no ``|x|`` temporary
    (several times faster on CPU). NaN propagates through both; ``+ 0.0`` turns the -0 that an
    all-zero slice can give into numpy's +0 (it would otherwise reach a stored zero scale)."""
    return torch.maximum(x.amax(dim=dim, keepdim=True), -x.amin(dim=dim, keepdim=True)) + 0.0


def _to_host(t: torch.Tensor) -> np.ndarray:
    """Device tensor -> host numpy; bfloat16 becomes its uint16 bits (numpy has no bfloat16), with
    the reinterpretation done on the host so no uint16 kernel is needed on the device."""
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def round_up_to(scale: torch.Tensor, dtype: torch.dtype, checks: list) -> torch.Tensor:
    """float64 ``scale`` >= 0 -> ``dtype``, rounded up: the smallest ``dtype`` value >= ``scale``
    (numpy's ``_round_up_to``); an overflow to Inf is reported through ``checks``."""
    s = scale.to(dtype)
    s = torch.where(s.double() < scale, torch.nextafter(s, _const(float("inf"), s, dtype)), s)
    checks.append(
        ((~torch.isfinite(s)).any(), f"quantisation scale overflows {_dtype_name(dtype)}; use the bf16 codec")
    )
    return s


def _quantise(
    x: torch.Tensor, absmax: torch.Tensor, bits: int, scale_dtype: torch.dtype, checks: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """numpy's ``_quantise``: float64 scale rounded up, float32 ``rint(x / s)``, clipped."""
    qmax = 2 ** (bits - 1) - 1
    scale = round_up_to(absmax.double() / _const(qmax + 0.5, x), scale_dtype, checks)
    safe = torch.where(scale > 0, scale.float(), 1.0)
    q = (x / safe).round_().clamp_(-qmax - 1, qmax).to(torch.int8)  # round: half to even, like rint
    return q, scale


def numpy_sum_lastdim(v: torch.Tensor) -> torch.Tensor:
    """``v.sum(-1)`` in numpy's order (pairwise_sum in numpy's loops_utils.h), so float64 sums
    round exactly like ``np.sum(v, axis=-1)`` on a contiguous array. numpy adds the pairwise sum
    to the reduction's identity 0, which turns a -0 into +0: kept."""
    return _pairwise(v) + 0.0


def _pairwise(v: torch.Tensor) -> torch.Tensor:
    n = v.shape[-1]
    if n < 8:
        out = torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device)
        for i in range(n):
            out = out + v[..., i]
        return out
    if n <= _PW_BLOCK:  # 8 running sums over strided elements, combined as a fixed tree
        m = n - n % 8
        blocks = v[..., :m].unflatten(-1, (m // 8, 8))
        r = blocks[..., 0, :].clone()
        for i in range(1, m // 8):
            r += blocks[..., i, :]  # in place: no allocation per step
        out = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))
        for i in range(m, n):
            out = out + v[..., i]
        return out
    n2 = n // 2 - (n // 2) % 8
    if 2 * n2 == n:  # equal halves share one recursion (C = 1024: 3 levels of one call each)
        halves = _pairwise(v.unflatten(-1, (2, n2)))
        return halves[..., 0] + halves[..., 1]
    return _pairwise(v[..., :n2]) + _pairwise(v[..., n2:])


# -- the presets ----------------------------------------------------------------------------


@register_torch_encoder("bf16")
def _enc_bf16(x, checks):
    y = x.to(torch.bfloat16)  # RNE, = numpy's (u + 0x7FFF + lsb) >> 16 for finite inputs
    checks.append((torch.isinf(y).any(), "value out of bfloat16 range (overflows to Inf)"))
    return {"values": y}  # _to_host stores the bits as uint16


@register_torch_encoder("fp16")
def _enc_fp16(x, checks):
    checks.append(
        (
            (abs_max(x, 2) > torch.finfo(torch.float16).max).any(),
            "value out of float16 range (max 65504); use the bf16 or int8 codec",
        )
    )
    return {"values": x.to(torch.float16)}


@register_torch_encoder("int8")
def _enc_int8(x, checks):
    q, s = _quantise(x, abs_max(x, 2), 8, torch.float32, checks)
    return {"values": q, "scale": s}


@register_torch_encoder("int8_channel")
def _enc_int8_channel(x, checks):
    q, s = _quantise(x, abs_max(x, 1), 8, torch.float32, checks)
    return {"values": q, "scale": s}


def _int4(name: str, group: int) -> None:
    @register_torch_encoder(name)
    def enc(x, checks):
        b, n, c = x.shape
        get_codec(name).components(n, c)  # the numpy codec's channel/group validation and message
        g = x.reshape(b, n, c // group, group)
        q, s = _quantise(g, abs_max(g, 3), 4, torch.float16, checks)
        nib = q.reshape(b, n, c).view(torch.uint8) & 0x0F  # 4-bit two's complement
        return {"values": nib[..., 0::2] | (nib[..., 1::2] << 4), "scale": s[..., 0]}


_int4("int4", 32)
_int4("int4_g64", 64)


@register_torch_encoder("ecsq")
def _enc_ecsq(x, checks):
    """numpy's ``_enc_ecsq``: levels from float64 absmax / (0.4 rms), then int8 quantisation."""
    b, n, c = x.shape
    absmax = abs_max(x, 2).double()
    flat = x.reshape(b * n, c)
    step = max(1, _ECSQ_CHUNK // max(c, 1))
    sumsq = torch.cat([numpy_sum_lastdim(flat[i : i + step].double().square_()) for i in range(0, b * n, step)])
    rms = torch.sqrt(sumsq.reshape(b, n, 1) / _const(c, x))
    ratio = torch.where(absmax > 0, absmax / (np_codecs.ECSQ_STEP_RMS * rms), 1.0)
    levels = torch.clamp(torch.floor(ratio), 1, 127)
    scale = round_up_to(absmax / (levels + 0.5), torch.float32, checks)
    safe = torch.where(scale > 0, scale, 1.0)
    q = (x / safe).round_().clamp_(-128, 127).to(torch.int8)
    return {"values": q, "scale": scale}
