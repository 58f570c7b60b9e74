"""The fidelity each codec should reach, derived from its documented quantiser, not from its code.

``expected_rel_mse(codec, x)`` predicts ``sum((x̂ - x)²) / sum(x²)`` for data ``x`` [B, N, C]:

- Uniform rounding with step Δ leaves an error uniform in ±Δ/2 when Δ is small against the data's
  spread, i.e. a variance of Δ²/12 per value (Bennett's high-resolution approximation).
- Absmax presets (cache/FORMAT.md §5): Δ = absmax / (qmax + 0.5) over the scale's extent (a
  token's channels for int8, a channel's tokens for int8_channel, 32/64 channels for int4),
  qmax = 127 (int8) or 7 (int4).
- ecsq: Δ = absmax / (levels + 0.5) with levels = clip(floor(absmax / (0.4 rms)), 1, 127) per token.
- 16-bit floats keep p significand bits: a value in [2^e, 2^(e+1)) has ulp 2^(e-p+1), so its relative
  rounding error variance (ulp/x)²/12 lies in [2^-2p, 2^(2-2p)] / 12 (p = 11 fp16, 8 bf16); the
  returned value is that exact per-value average, weighted by x² as the relative MSE is.
"""

from __future__ import annotations

import numpy as np

_ABSMAX = {"int8": (2, 127), "int8_channel": (1, 127), "int4": (32, 7), "int4_g64": (64, 7)}
_FLOAT_BITS = {"fp16": 11, "bf16": 8}


def expected_rel_mse(codec: str, x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if codec in _FLOAT_BITS:
        ulp = 2.0 ** (np.floor(np.log2(np.abs(x[x != 0]))) - _FLOAT_BITS[codec] + 1)
        return float((ulp**2 / 12).sum() / np.square(x).sum())
    if codec == "ecsq":
        absmax = np.abs(x).max(axis=2, keepdims=True)
        rms = np.sqrt(np.square(x).mean(axis=2, keepdims=True))
        step = absmax / (np.clip(np.floor(absmax / (0.4 * rms)), 1, 127) + 0.5)
        return float((np.broadcast_to(step, x.shape) ** 2 / 12).sum() / np.square(x).sum())
    extent, qmax = _ABSMAX[codec]
    if extent in (1, 2):  # int8: over tokens' channels (axis 2) or channels' tokens (axis 1)
        step = np.abs(x).max(axis=extent, keepdims=True) / (qmax + 0.5)
        return float((np.broadcast_to(step, x.shape) ** 2 / 12).sum() / np.square(x).sum())
    b, n, c = x.shape
    g = x.reshape(b, n, c // extent, extent)
    step = np.abs(g).max(axis=3, keepdims=True) / (qmax + 0.5)
    return float((np.broadcast_to(step, g.shape) ** 2 / 12).sum() / np.square(x).sum())
