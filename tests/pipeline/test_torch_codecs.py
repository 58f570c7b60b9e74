"""The torch codecs are the numpy codecs, bit for bit: every preset, on Gaussian, heavy-tailed and
extreme data and as a hypothesis property over shapes and value ranges; the same errors with the
same messages (NaN/Inf rows, bf16/fp16 range, scale overflow); numpy's summation order for ecsq;
round-up of scales through torch's double rounding; and the numpy fallback for unknown presets.
Runs on every available device (CPU always; CUDA too where present)."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache import codecs as np_codecs
from cache.codecs import NonFiniteError, get_codec, list_codecs
from pipeline import torch_codecs
from pipeline.extract_worker import _Accumulator
from pipeline.teachers.base import TeacherOutput
from pipeline.torch_codecs import encode_torch, numpy_sum_lastdim, round_up_to
from tests.helpers.quant_theory import expected_rel_mse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROPS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_MAX = float(np.finfo(np.float32).max)


def assert_same(codec: str, x: np.ndarray, device: str = "cpu") -> dict[str, np.ndarray] | None:
    """torch output == numpy output bit for bit, or both raise the same error. Returns the parts."""
    x = np.asarray(x, dtype=np.float32)
    try:
        want = get_codec(codec).encode(x)
    except ValueError as e:
        with pytest.raises(type(e), match=re.escape(str(e))):
            encode_torch(codec, torch.from_numpy(x).to(device))
        return None
    got = encode_torch(codec, torch.from_numpy(x).to(device))
    assert_bits(got, want, codec)
    return got


def assert_bits(got: dict[str, np.ndarray], want: dict[str, np.ndarray], codec: str) -> None:
    assert list(got) == list(want), codec
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"{codec}/{name}"
        same = np.ascontiguousarray(g).view(np.uint8) == np.ascontiguousarray(w).view(np.uint8)
        assert same.all(), f"{codec}/{name}: {int((~same).sum())} bytes differ"


def _data(kind: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(shape) * 3
    if kind == "heavy":  # Student-t, df 1.5: infinite variance, a few huge values per token
        return rng.standard_t(1.5, shape)
    if kind == "outlier_channels":  # ViT-like: a few channels carry most of the energy
        x = rng.standard_normal(shape)
        x[..., rng.choice(shape[-1], 3, replace=False)] *= 300
        return x
    raise ValueError(kind)


# -- bit-identity ----------------------------------------------------------------------------


def test_every_numpy_preset_has_a_torch_encoder():
    assert [c for c in list_codecs() if not torch_codecs.has_torch_encoder(c)] == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gaussian", "heavy", "outlier_channels"])
@pytest.mark.parametrize("codec", list_codecs())
def test_bit_identical_to_numpy_on_random_data(codec, kind, device):
    for seed, shape in enumerate([(3, 50, 256), (1, 7, 1024), (2, 1, 64)]):
        assert assert_same(codec, _data(kind, shape, seed), device) is not None or kind == "heavy"


def _extremes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2, 4, 128))
    sign = np.where(rng.random((2, 4, 128)) < 0.5, -1.0, 1.0)
    tiny = sign * 10.0 ** rng.uniform(-45.5, -36, (2, 4, 128))  # float32 subnormals and just above
    ties = np.arange(-127.5, 127.6, 1.0).reshape(1, 2, 128)  # absmax 127.5: scale 1, every x/s = k + 0.5
    bf16_max_ok = np.float32(np.uint32(0x7F7F7FFF).view(np.float32))  # rounds to bf16 max, not Inf
    return {
        "zeros": np.zeros((2, 3, 64)),
        "negative_zeros": -np.zeros((1, 2, 64)),
        "huge": base * 1e37,
        "float32_max": np.where(base > 1.5, F32_MAX, np.where(base < -1.5, -F32_MAX, base)),
        "bf16_edge": np.full((1, 1, 64), bf16_max_ok) * sign[:1, :1, :64],
        "fp16_max": np.full((1, 2, 64), 65504.0) * sign[:1, :2, :64],
        "fp16_just_over": np.r_[65504.0, 65519.0, np.zeros(62)].reshape(1, 1, 64),
        "int4_scale_edge": np.r_[65504.0 * 7.5, np.ones(63)].reshape(1, 1, 64),
        "int4_scale_over": np.r_[np.nextafter(np.float32(491280.0), np.float32(np.inf)), np.ones(63)].reshape(1, 1, 64),
        "tiny": tiny,
        "min_subnormal": np.r_[1e-45, -1e-45, np.zeros(62)].reshape(1, 1, 64),
        "mixed_magnitudes": base * 10.0 ** rng.integers(-30, 30, (2, 4, 128)),
        "ties_to_even": ties,
        "negative_extreme": np.r_[-1.0, 0.25, np.full(62, 0.5)].reshape(1, 1, 64),
        "one_spike": np.r_[3.0, np.zeros(63)].reshape(1, 1, 64),  # ecsq: absmax / (0.4 rms) = 20
    }


@pytest.mark.filterwarnings("ignore:overflow encountered in nextafter")  # numpy's own, on int4_scale_over
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(_extremes()))
@pytest.mark.parametrize("codec", list_codecs())
def test_bit_identical_or_same_error_on_extreme_values(codec, case, device):
    assert_same(codec, _extremes()[case], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("codec", "limit"), [("bf16", 3.3e38), ("fp16", 65504.0)])
def test_16bit_casts_match_on_random_bit_patterns(codec, limit, device):
    """Every exponent, subnormals and ties included: torch's cast is numpy's RNE."""
    bits = np.random.default_rng(7).integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.where(np.abs(x) <= limit, x, np.float32(0.0)).reshape(16, 64, 1024)  # NaN/Inf/overflow -> 0
    assert_same(codec, x, device)


@pytest.mark.parametrize("codec", list_codecs())
def test_empty_batches_and_non_float32_inputs(codec):
    assert_same(codec, np.zeros((0, 5, 128)))
    x = torch.from_numpy(_data("gaussian", (2, 128, 9), 3).astype(np.float32)).transpose(1, 2)  # not contiguous
    assert_bits(encode_torch(codec, x), get_codec(codec).encode(x.numpy()), codec)
    xb = x.to(torch.bfloat16)  # bf16 teacher outputs: numpy sees their (exact) float32 values
    assert_bits(encode_torch(codec, xb), get_codec(codec).encode(xb.float().numpy()), codec)


@pytest.mark.parametrize("codec", list_codecs())
@PROPS
@given(
    batch=st.integers(0, 3),
    tokens=st.integers(1, 12),
    channels=st.sampled_from([64, 128, 192, 320, 1024]),
    log10_scale=st.floats(-44, 38),
    dist=st.sampled_from(["gaussian", "heavy", "outlier_channels"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_bit_identical_property(codec, batch, tokens, channels, log10_scale, dist, seed):
    x = _data(dist, (batch, tokens, channels), seed) * 10.0**log10_scale
    assert_same(codec, np.clip(x, -F32_MAX, F32_MAX))


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec", list_codecs())
def test_nonfinite_rows_are_reported_like_numpy(codec, device):
    x = _data("gaussian", (6, 4, 64)).astype(np.float32)
    x[1, 2, 3], x[3, 0, 0], x[4, 3, 63] = np.nan, np.inf, -np.inf
    x[5, 0, 0] = 1e30  # an overflow elsewhere: NaN/Inf still wins, as in numpy
    with pytest.raises(NonFiniteError) as want:
        get_codec(codec).encode(x)
    with pytest.raises(NonFiniteError) as got:
        encode_torch(codec, torch.from_numpy(x).to(device))
    assert got.value.rows == want.value.rows == [1, 3, 4]


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"expected \[batch, tokens, channels\]"):
        encode_torch("int8", torch.zeros(4, 64))
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        encode_torch("int4", torch.zeros(1, 2, 48))
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        encode_torch("int3", torch.zeros(1, 2, 64))


# -- the subtle parts ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_sum_follows_numpys_pairwise_order(device):
    """Wide dynamic range makes every float64 addition round, so any other order differs."""
    rng = np.random.default_rng(11)
    for c in [*range(1, 140), 255, 256, 257, 383, 768, 1000, 1024, 1152, 1280, 4100, 9000]:
        x = (rng.standard_normal((5, 3, c)) * 10.0 ** rng.uniform(-8, 8, (5, 3, c))).astype(np.float32)
        v = np.square(x, dtype=np.float64)
        got = numpy_sum_lastdim(torch.from_numpy(v).to(device)).cpu().numpy()
        np.testing.assert_array_equal(got.view(np.uint64), v.sum(axis=2).view(np.uint64), err_msg=f"C={c}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_scale_round_up_matches_numpy_despite_double_rounding(dtype, device):
    """torch casts float64 -> float16 through float32 (two roundings); the round-up must still give
    numpy's result: the smallest storable value >= the exact scale."""
    finite = np.arange(0, 0x7C00 if dtype == np.float16 else 0x7F800000, 9973 if dtype == np.float32 else 1)
    h = finite.astype(np.uint16 if dtype == np.float16 else np.uint32).view(dtype).astype(np.float64)
    mid = (h[:-1] + h[1:]) / 2
    scale = np.concatenate([h, mid, mid * (1 + 2.0**-40), mid * (1 - 2.0**-40), np.nextafter(mid, 0), [1e300]])
    want, checks = np_codecs._round_up_to(scale[:-1], dtype), []
    got = round_up_to(torch.from_numpy(scale[:-1]).to(device), getattr(torch, np.dtype(dtype).name), checks)
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint8), want.view(np.uint8))
    assert not checks[0][0].item()
    round_up_to(torch.from_numpy(scale).to(device), getattr(torch, np.dtype(dtype).name), checks)
    assert checks[1][0].item() and "overflows" in checks[1][1]


def test_unknown_presets_fall_back_to_numpy_with_one_log_line(monkeypatch, caplog):
    monkeypatch.delitem(torch_codecs._ENCODERS, "int8")
    monkeypatch.setattr(torch_codecs, "_FELL_BACK", set())
    x = _data("gaussian", (2, 8, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="pipeline.torch_codecs"):
        for _ in range(2):
            assert_bits(encode_torch("int8", torch.from_numpy(x)), get_codec("int8").encode(x), "int8")
    assert [r.getMessage() for r in caplog.records] == [
        "codec int8 has no torch encoder; encoding it with numpy on the host"
    ]


# -- round trip ------------------------------------------------------------------------------
# Measured on this data (2026-12-01) and pinned with 5 % headroom; each is also within -10 %/+12 %
# of the step-rule prediction: bf16 2.76e-6, fp16 4.25e-8, int8 4.98e-5, int8_channel 3.73e-5,
# int4 9.14e-3, int4_g64 1.08e-2, ecsq 1.34e-2.
PINNED_REL_MSE = {
    "bf16": 2.9e-6, "fp16": 4.5e-8, "int8": 5.2e-5, "int8_channel": 3.9e-5,
    "int4": 9.6e-3, "int4_g64": 1.13e-2, "ecsq": 1.41e-2,
}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec", list_codecs())
def test_roundtrip_through_numpy_decode_has_the_derived_fidelity(codec, device):
    x = _data("gaussian", (4, 64, 256), 1).astype(np.float32)
    c = get_codec(codec)
    parts = encode_torch(codec, torch.from_numpy(x).to(device))
    y = c.decode(parts)
    rel_mse = float(((y - x) ** 2).sum() / (x**2).sum())
    expected = expected_rel_mse(codec, x)  # from the documented step rule (tests/helpers/quant_theory.py)
    assert 0.9 <= rel_mse / expected <= 1.12, f"{codec}: rel MSE {rel_mse:.4g}, the step rule predicts {expected:.4g}"
    assert rel_mse <= PINNED_REL_MSE[codec], f"{codec}: rel MSE {rel_mse:.4g} > pinned {PINNED_REL_MSE[codec]:.4g}"
    if "scale" in parts:  # absmax presets: every error within half a step (+ float32 rounding)
        s = parts["scale"].astype(np.float32)
        step = s if s.shape[2] in (1, x.shape[2]) else np.repeat(s, x.shape[2] // s.shape[2], axis=2)
        assert (np.abs(y - x) <= step / 2 + 2 * np.spacing(np.abs(x))).all()


# -- the extraction worker -------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["int8", "bf16", "int4"])
def test_worker_marks_nonfinite_rows_failed_and_stores_them_as_zeros(codec):
    tokens = torch.from_numpy(_data("gaussian", (4, 6, 64), 9).astype(np.float32))
    tokens[2, 1, 5] = float("nan")
    with torch.inference_mode():  # teachers return inference tensors: zeroing must be out of place
        frozen = tokens.clone()
    teacher = SimpleNamespace(preprocess_spec="p", encode=lambda x: TeacherOutput(tokens=frozen))
    acc = _Accumulator({"t": teacher}, SimpleNamespace(codec_for=lambda name: codec, cls_teacher=None))
    failed, times = {"k0": "cannot decode image: truncated"}, defaultdict(float)
    acc.add(["k0", "k1", "k2", "k3"], {0: np.zeros((4, 3, 2, 2), np.float32)}, {"p": 0}, failed, times, "cpu")
    assert failed == {"k0": "cannot decode image: truncated", "k2": "teacher t produced NaN/Inf"}
    want = tokens.numpy().copy()
    want[[0, 2]] = 0
    assert_bits(acc.encoded()["t"], get_codec(codec).encode(want), codec)
    assert set(times) == {"teacher/t", "quantise"}
