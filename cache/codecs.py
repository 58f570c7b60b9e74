"""Codecs: how a teacher's ``[B, N, C]`` float tokens become stored arrays, and back.

A codec turns one batch of token features into named *components* (e.g. ``values`` and
``scale``), each stored as its own zarr array with one inner chunk per image. Decisions:

- Presets are looked up by name in a registry (``get_codec("int8")``), timm-style, so the
  manifest records a name and every reader rebuilds the same codec.
- Lossless 16-bit presets store bits (``bf16`` as uint16, zarr has no bfloat16) with blosc
  byte-shuffle + zstd: the exponent bytes compress, the mantissas do not (docs/method.md §10).
- Quantised presets are symmetric absmax with 2**(bits-1) levels each side: ``scale = absmax /
  (qmax + 0.5)`` and ``q = clip(round(x / scale), qmin, qmax)``, so every value's error is at most
  half a step and the negative extreme level is used too. Integer payloads then go through zstd,
  which entropy-codes the (Gaussian-like) level histogram: that is what brings int8 close to the
  rate-distortion bound. Scales are rounded *up* to their storage dtype before quantising, so
  the error bound holds exactly for the stored scale.
- ``ecsq`` (entropy-coded scalar quantisation) is the 4-bit-class preset. Fixed 4-bit levels pay
  for their float16 group scales (16/32 = 0.5 bit/value for ``int4``) and spend levels on each
  group's extremes; ``ecsq`` instead gives each token a uniform step of about ``0.4 x`` its RMS in
  the int8 container (``levels = floor(absmax / (0.4 * rms))`` each side, at most 127) and lets zstd
  entropy-code the levels. Fidelity is then set by the step, not the data (rel. MSE about
  ``0.4**2 / 12 = 1.3e-2``), the scale costs 32/C bits, the stored layout and decoding are exactly
  ``int8``'s, and on real ViT features it is smaller than ``int4`` at the same fidelity and within
  0.5 bit/value of the Gaussian rate-distortion bound (BENCHMARKS.md). Its levels are compressed
  with zstd level 1 (``zstd-1``): on such low-entropy bytes level 3 takes short matches that cost
  more than they save (it stores 0.3 to 0.4 bit/value more than level 1 on DINOv2 features, 0.5
  more on i.i.d. Gaussian data, where level 1 is about 0.05 above the order-0 entropy) and is 2 to 3
  times slower. The level is an encoder choice only: any zstd decoder reads both.
- Everything is vectorised numpy (no per-token Python loops); NaN/Inf raise
  ``NonFiniteError`` naming the batch rows, which the writer maps to image keys.

Measured size and fidelity of each preset live in ``BENCHMARKS.md`` (bench/bench_codecs.py);
``rel_mse_bound`` below is the documented bound the round-trip tests assert on Gaussian data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class NonFiniteError(ValueError):
    """NaN or Inf in features; ``rows`` are the offending batch rows."""

    def __init__(self, rows: list[int], what: str = "features"):
        super().__init__(f"{what} contain NaN/Inf in batch row(s) {rows}")
        self.rows = rows


@dataclass(frozen=True)
class Component:
    """One stored array of a codec: per-image shape, numpy dtype, and byte compressor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    compressor: str  # "zstd" (level 3), "zstd-1" (level 1) or "blosc-shuffle" (byte shuffle + zstd)


@dataclass(frozen=True)
class Codec:
    """A named encoding. ``encode``/``decode`` work on whole batches."""

    name: str
    description: str
    lossless_from: str | None  # input dtype it reproduces bit-exactly ("bfloat16"), else None
    rel_mse_bound: float  # documented bound on Gaussian-like data (tests assert it)
    bits_per_value: float  # before entropy coding, scales included for C=1024
    _components: Callable[[int, int], tuple[Component, ...]]
    _encode: Callable[[np.ndarray], dict[str, np.ndarray]]
    _decode: Callable[[dict[str, np.ndarray]], np.ndarray]

    def components(self, tokens: int, channels: int) -> tuple[Component, ...]:
        return self._components(tokens, channels)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``x``: float array ``[B, N, C]`` -> ``{component: array [B, *shape]}``."""
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"codec {self.name}: expected [batch, tokens, channels], got shape {x.shape}")
        check_finite(x)
        return self._encode(x.astype(np.float32, copy=False))

    def decode(self, parts: dict[str, np.ndarray], dtype: np.dtype | str = np.float32) -> np.ndarray:
        return self._decode(parts).astype(dtype, copy=False)


_REGISTRY: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if codec.name in _REGISTRY:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {sorted(_REGISTRY)}") from None


def list_codecs() -> list[str]:
    return sorted(_REGISTRY)


def check_finite(x: np.ndarray, what: str = "features") -> None:
    finite = np.isfinite(x)
    if not finite.all():
        rows = np.nonzero(~finite.reshape(x.shape[0], -1).all(axis=1))[0].tolist()
        raise NonFiniteError(rows, what)


# -- 16-bit floats ---------------------------------------------------------------------------


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16). Exact for bf16 inputs."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    if ((out & 0x7F80) == 0x7F80).any():
        raise ValueError("value out of bfloat16 range (overflows to Inf)")
    return out


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _enc_fp16(x: np.ndarray) -> dict[str, np.ndarray]:
    if np.abs(x).max(initial=0.0) > np.finfo(np.float16).max:
        raise ValueError("value out of float16 range (max 65504); use the bf16 or int8 codec")
    return {"values": x.astype(np.float16)}


def _lossless16(name: str, dtype: str, enc, dec, desc: str, exact: str, bound: float) -> Codec:
    return Codec(
        name=name,
        description=desc,
        lossless_from=exact,
        rel_mse_bound=bound,
        bits_per_value=16,
        _components=lambda n, c: (Component("values", (n, c), dtype, "blosc-shuffle"),),
        _encode=enc,
        _decode=dec,
    )


# -- symmetric absmax integer quantisation ---------------------------------------------------


def _round_up_to(scale: np.ndarray, dtype) -> np.ndarray:
    """``scale`` (float64) -> ``dtype``, rounded up so that no stored scale is below the exact one."""
    with np.errstate(over="ignore"):  # overflow is reported below, with what to do about it
        s = scale.astype(dtype)
    low = s.astype(np.float64) < scale
    if low.any():
        s[low] = np.nextafter(s[low], np.array(np.inf, dtype=dtype))
    if not np.isfinite(s).all():
        raise ValueError(f"quantisation scale overflows {np.dtype(dtype).name}; use the bf16 codec")
    return s


def _quantise(x: np.ndarray, absmax: np.ndarray, bits: int, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    qmax = 2 ** (bits - 1) - 1
    # float64 division: a float32 quotient rounded to nearest could sit below absmax/(qmax+0.5)
    scale = _round_up_to(absmax.astype(np.float64) / (qmax + 0.5), scale_dtype)
    safe = np.where(scale > 0, scale.astype(np.float32), np.float32(1.0))
    q = np.clip(np.rint(x / safe), -qmax - 1, qmax).astype(np.int8)
    return q, scale


ECSQ_STEP_RMS = 0.4  # ecsq's target step as a fraction of the token's RMS (float64 constant)


def _enc_ecsq(x):
    """Per-token absmax quantiser whose level count adapts to the token (see FORMAT.md section 5).

    ``levels = clip(floor(absmax / (0.4 * rms)), 1, 127)``, so the step ``absmax / (levels + 0.5)``
    is about 0.4 rms and never clips; all in float64 (the sum of squares is the only order-dependent
    step: a torch mirror can differ only when the ratio lies within float64 rounding of an integer).
    """
    absmax = np.abs(x).max(axis=2, keepdims=True).astype(np.float64)
    rms = np.sqrt(np.square(x, dtype=np.float64).sum(axis=2, keepdims=True) / x.shape[2])
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero tokens: levels 1, scale 0
        ratio = np.where(absmax > 0, absmax / (ECSQ_STEP_RMS * rms), 1.0)
    levels = np.clip(np.floor(ratio), 1, 127)
    scale = _round_up_to(absmax / (levels + 0.5), np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe), -128, 127).astype(np.int8)  # |x / scale| <= levels + 0.5 <= 127.5
    return {"values": q, "scale": scale}


def _enc_int8_token(x):
    q, s = _quantise(x, np.abs(x).max(axis=2, keepdims=True), 8, np.float32)
    return {"values": q, "scale": s}


def _enc_int8_channel(x):
    q, s = _quantise(x, np.abs(x).max(axis=1, keepdims=True), 8, np.float32)
    return {"values": q, "scale": s}


def _dec_int8(p):
    return p["values"].astype(np.float32) * p["scale"].astype(np.float32)


def _int8(name: str, per: str) -> Codec:
    def comps(n, c):
        shape = (n, 1) if per == "token" else (1, c)
        return (Component("values", (n, c), "int8", "zstd"), Component("scale", shape, "float32", "zstd"))

    return Codec(
        name=name,
        description=f"int8, per-{per} absmax scale (float32), zstd",
        lossless_from=None,
        rel_mse_bound=1e-4,
        bits_per_value=8 + 32 / 1024,
        _components=comps,
        _encode=_enc_int8_token if per == "token" else _enc_int8_channel,
        _decode=_dec_int8,
    )


def _ecsq() -> Codec:
    return Codec(
        name="ecsq",
        description="int8 levels, per-token step ~0.4 x token RMS (float32 scale), zstd "
        "entropy-codes them: 4-bit-class fidelity (rel. MSE ~1.3e-2) below 4 bits/value",
        lossless_from=None,
        rel_mse_bound=2e-2,
        bits_per_value=8 + 32 / 1024,
        _components=lambda n, c: (
            Component("values", (n, c), "int8", "zstd-1"),
            Component("scale", (n, 1), "float32", "zstd"),
        ),
        _encode=_enc_ecsq,
        _decode=_dec_int8,
    )


def _int4(name: str, group: int) -> Codec:
    def comps(n, c):
        if c % group or group % 2:
            raise ValueError(f"codec {name}: channels ({c}) must be a multiple of the group size {group}")
        return (
            Component("values", (n, c // 2), "uint8", "zstd"),
            Component("scale", (n, c // group), "float16", "zstd"),
        )

    def enc(x):
        b, n, c = x.shape
        comps(n, c)
        g = x.reshape(b, n, c // group, group)
        q, s = _quantise(g, np.abs(g).max(axis=3, keepdims=True), 4, np.float16)
        nib = q.reshape(b, n, c).astype(np.uint8) & 0x0F
        return {"values": nib[..., 0::2] | (nib[..., 1::2] << 4), "scale": s[..., 0]}

    def dec(p):
        packed = p["values"]
        b, n, half = packed.shape
        nib = np.empty((b, n, half * 2), dtype=np.uint8)
        nib[..., 0::2], nib[..., 1::2] = packed & 0x0F, packed >> 4
        q = (nib.astype(np.int8) << 4) >> 4  # sign-extend 4-bit two's complement
        s = p["scale"].astype(np.float32)
        groups = s.shape[-1]  # explicit group size: reshape(..., -1) fails for an empty batch
        return (q.reshape(b, n, groups, half * 2 // groups).astype(np.float32) * s[..., None]).reshape(b, n, half * 2)

    return Codec(
        name=name,
        description=f"int4, absmax scale (float16) per group of {group} channels, 2 values/byte, zstd",
        lossless_from=None,
        rel_mse_bound=2e-2,
        bits_per_value=4 + 16 / group,
        _components=comps,
        _encode=enc,
        _decode=dec,
    )


register_codec(
    _lossless16(
        "bf16",
        "uint16",
        lambda x: {"values": float_to_bf16_bits(x)},
        lambda p: bf16_bits_to_float(p["values"]),
        "bfloat16 bits stored as uint16, blosc byte-shuffle + zstd; bit-exact for bf16 teacher outputs",
        "bfloat16",
        2e-5,
    )
)
register_codec(
    _lossless16(
        "fp16",
        "float16",
        _enc_fp16,
        lambda p: p["values"].astype(np.float32),
        "float16, blosc byte-shuffle + zstd; bit-exact for fp16 teacher outputs",
        "float16",
        1e-6,
    )
)
register_codec(_int8("int8", "token"))
register_codec(_int8("int8_channel", "channel"))
register_codec(_int4("int4", 32))
register_codec(_int4("int4_g64", 64))
register_codec(_ecsq())
