"""Targets decoded on the training device (``student.target_decode``) equal the numpy host decode
bit for bit, for every registered codec: every stored bit pattern of 16-bit values, every int8
level and int4 nibble pair, zero/subnormal/extreme scales, encoded edge rows and the empty batch;
a codec without a torch decoder falls back to numpy; and a training run whose DataLoader hands
over encoded targets equals the run with host-decoded float32 targets (losses, weights)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import numpy as np
import pytest
import torch

from cache.codecs import get_codec, list_codecs
from student import target_decode
from student.config import TrainConfig
from student.data import collate_distill
from student.model import build_student
from student.target_decode import ENCODED_KEY, decode_batch_targets, decode_targets, parts_to_torch
from student.tiny import make_tiny_llava_parts
from student.trainer import Trainer
from tests.student._trainer_fixtures import PAD_ID, RandomDistillDataset, make_sampler, tiny_config, tiny_manifest

TOKENS, CHANNELS = 64, 128  # 8192 values per image; int4_g64 needs channels % 64 == 0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
F32_EDGES = [0.0, 1e-45, 1.2e-38, 1e-40, 5.9e-39, 1e-30, 1.0, 3.0e38, np.finfo(np.float32).max]
F16_EDGES = [0.0, 6e-8, 6.1e-5, 1e-6, 1.0, 0.0078, 65504.0]


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def assert_bit_equal(name: str, parts: dict[str, np.ndarray], device: str) -> None:
    """Same bits everywhere, except that a NaN (never stored: the encoders refuse NaN) need only
    stay a NaN (float16 -> float32 in torch quiets a signalling NaN's payload; numpy keeps it)."""
    with np.errstate(over="ignore"):  # the largest scales times 127 overflow to Inf, in both
        host = get_codec(name).decode(parts)
    dev = decode_targets(name, parts_to_torch(parts), device)
    assert dev.device.type == device and dev.dtype == torch.float32
    assert tuple(dev.shape) == host.shape
    dev = dev.cpu().numpy()
    nan = np.isnan(host)
    np.testing.assert_array_equal(np.isnan(dev), nan)
    np.testing.assert_array_equal(bits(dev)[~nan], bits(host)[~nan])


def stored_patterns(name: str, images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every component filled with edge patterns of its dtype: all 2**16 patterns of 16-bit values
    (finite and not), all 256 int8 levels / packed nibble pairs cycled, scales from the edge lists
    (zero, subnormal, largest) and random positives."""
    out = {}
    for comp in get_codec(name).components(TOKENS, CHANNELS):
        shape, n = (images, *comp.shape), images * int(np.prod(comp.shape))
        dtype = np.dtype(comp.dtype)
        if comp.name == "values" and dtype.itemsize == 2:
            flat = (np.arange(n) % 2**16).astype(np.uint16).view(dtype)
        elif comp.name == "values":
            flat = (np.arange(n) % 256).astype(np.uint8).view(dtype)
        else:
            edges = np.array(F16_EDGES if dtype == np.float16 else F32_EDGES, dtype=dtype)
            flat = rng.uniform(0, 2, n).astype(dtype)
            flat[: edges.size * (n // edges.size)] = np.tile(edges, n // edges.size)
            flat = rng.permutation(flat)
        out[comp.name] = flat.reshape(shape)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list_codecs())
def test_every_stored_pattern_decodes_bit_identically(name, device):
    parts = stored_patterns(name, 8, np.random.default_rng(0))
    if name == "bf16":
        assert np.unique(parts["values"]).size == 2**16  # every bit pattern, NaN and Inf included
    assert_bit_equal(name, parts, device)


def edge_features(rng: np.random.Generator) -> np.ndarray:
    """Gaussian images with edge rows: an all-zero image, zero tokens, tiny values (subnormal scales),
    a constant token, large magnitudes and a single spike per token (max-magnitude levels)."""
    x = rng.standard_normal((6, TOKENS, CHANNELS)).astype(np.float32)
    x[0] = 0.0
    x[1, :5] = 0.0
    x[2] *= np.float32(1e-39)  # absmax / (qmax + 0.5) is subnormal in float32 (and 0 in float16)
    x[3, :3] = 7.0
    x[4] *= np.float32(1e4)
    x[5] = 0.0
    x[5, :, 0] = -3.0  # -absmax: the negative extreme level (-qmax - 1 only where half a step fits)
    x[5, :, 1] = 3.0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list_codecs())
def test_encoded_edge_rows_decode_bit_identically(name, device):
    x = edge_features(np.random.default_rng(1))
    if name == "fp16":
        x[4] = np.clip(x[4], -65504, 65504)
    parts = get_codec(name).encode(x)
    if "scale" in parts and name != "int8_channel":
        assert (parts["scale"][0] == 0).all() and (parts["scale"][2] > 0).any()
    assert_bit_equal(name, parts, device)


@pytest.mark.parametrize("name", list_codecs())
def test_empty_batch(name):
    parts = get_codec(name).encode(np.zeros((0, TOKENS, CHANNELS), dtype=np.float32))
    out = decode_targets(name, parts_to_torch(parts), "cpu")
    assert out.shape == (0, TOKENS, CHANNELS) and out.dtype == torch.float32


def test_codec_without_torch_decoder_falls_back_to_numpy(monkeypatch, caplog):
    monkeypatch.delitem(target_decode._DECODERS, "int8")
    monkeypatch.setattr(target_decode, "_FELL_BACK", set())
    x = edge_features(np.random.default_rng(2))
    parts = get_codec("int8").encode(x)
    with caplog.at_level(logging.WARNING, logger="student.target_decode"):
        assert_bit_equal("int8", parts, "cpu")
        assert_bit_equal("int8", parts, "cpu")
    assert [r.getMessage() for r in caplog.records] == [
        "codec int8 has no torch decoder; decoding its targets with numpy on the host"
    ]
    with pytest.raises(ValueError, match="unknown codec 'int9'"):
        decode_targets("int9", parts)


def test_decode_batch_targets():
    x = edge_features(np.random.default_rng(3))
    parts = get_codec("int4").encode(x)
    batch = {"input_ids": torch.zeros(6, 2), ENCODED_KEY: {"eva": {"codec": "int4", "parts": parts_to_torch(parts)}}}
    out = decode_batch_targets(batch)
    assert ENCODED_KEY not in out and ENCODED_KEY in batch and out["input_ids"] is batch["input_ids"]
    np.testing.assert_array_equal(bits(out["targets"]["eva"].numpy()), bits(get_codec("int4").decode(parts)))
    plain = {"targets": {"eva": torch.zeros(1)}}
    assert decode_batch_targets(plain) is plain


# -- a training run: encoded hand-over + device decode == host float32 -------------------------
CODECS = {"clip": "bf16", "eva": "int8", "convnext": "int8_channel"}  # tiny channels: 32, 12, 24


class EncodedDataset(RandomDistillDataset):
    """The random rows with targets through each teacher's codec: decoded on the host (float32
    ``targets``, as ``DistillDataset`` by default) or as stored (``encoded_targets``)."""

    def __init__(self, *args, encoded: bool, **kw) -> None:
        super().__init__(*args, **kw)
        self.encoded = encoded

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        stored = {t: get_codec(CODECS[t]).encode(v.numpy()[None]) for t, v in sample.pop("targets").items()}
        if self.encoded:
            sample[ENCODED_KEY] = {
                t: {"codec": CODECS[t], "parts": {c: torch.from_numpy(a[0]) for c, a in p.items()}}
                for t, p in stored.items()
            }
        else:
            sample["targets"] = {t: torch.from_numpy(get_codec(CODECS[t]).decode(p)[0]) for t, p in stored.items()}
        return sample


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_llava_parts(tmp_path_factory.mktemp("tiny"))


def train_run(parts, out, encoded: bool):
    torch.set_num_threads(1)
    cfg = tiny_config(parts, out, max_steps=4, plot=False, target_decode="device" if encoded else "host")
    manifest = tiny_manifest()
    model = build_student(cfg, manifest)
    dataset = EncodedDataset(16, manifest, encoded=encoded)
    collate = functools.partial(collate_distill, pad_token_id=PAD_ID)
    trainer = Trainer(cfg, model, dataset, collate, make_sampler("none", dataset, cfg.batch_size))
    trainer.train()
    timing = ("tokens_per_s", "images_per_s", "step_time_s")
    log = [{k: v for k, v in json.loads(line).items() if k not in timing} for line in trainer.log_path.open()]
    return log, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def test_training_with_device_decode_equals_host_decode(parts, tmp_path):
    before = torch.get_num_threads()
    try:
        host_log, host_w, host = train_run(parts, tmp_path / "host", encoded=False)
        dev_log, dev_w, dev = train_run(parts, tmp_path / "device", encoded=True)
    finally:
        torch.set_num_threads(before)
    assert [r["step"] for r in dev_log] == [1, 2, 3, 4]
    assert dev_log == host_log  # every loss part, grad norm and lr, exactly
    assert dev_w.keys() == host_w.keys()
    for name, w in host_w.items():
        assert torch.equal(dev_w[name], w), name
    batch = dev.collate_fn([dev.dataset[i] for i in range(4)])
    assert batch[ENCODED_KEY]["eva"]["parts"]["values"].dtype == torch.int8
    assert batch[ENCODED_KEY]["clip"]["parts"]["values"].dtype == torch.uint16
    with pytest.raises(ValueError, match="holds encoded_targets"):
        dev.module(batch)
    ref = host.collate_fn([host.dataset[i] for i in range(4)])
    assert all(torch.equal(decode_batch_targets(batch)["targets"][t], ref["targets"][t]) for t in CODECS)


def test_target_decode_config():
    cfg = TrainConfig()
    assert cfg.target_decode == "auto" and TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.decode_targets_on_device("cuda:0") and not cfg.decode_targets_on_device("cpu")
    assert dataclasses.replace(cfg, target_decode="device").decode_targets_on_device("cpu")
    assert not dataclasses.replace(cfg, target_decode="host").decode_targets_on_device("cuda")
    with pytest.raises(ValueError, match="target_decode must be one of"):
        dataclasses.replace(cfg, target_decode="gpu")
