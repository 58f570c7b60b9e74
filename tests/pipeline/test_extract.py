"""Extraction without Ray: the worker writes shards whose features equal a direct teacher forward.

``ShardExtractor`` is the code every Ray actor runs; here the public in-process runner
(``pipeline.extract.extract_in_process``, over the same ``plan`` as the Ray runner) drives it, so
every registered teacher family can be checked quickly. The Ray orchestration is tested in tests/e2e.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache import open_cache, verify_cache
from cache.preprocess import null_image_tensor, preprocess_image
from pipeline.extract import extract_in_process, plan
from pipeline.extract_config import ExtractConfig
from pipeline.extract_worker import ShardExtractor
from pipeline.teachers import build_teacher
from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers.datasets import corrupt_member, pack_crops

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_specs(tmp_path_factory):
    return {s.name: s for s in make_tiny_teachers(tmp_path_factory.mktemp("tiny"))}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_crops(str(tmp_path_factory.mktemp("data")), n=6, shard_size=4)


def planned_worker(cfg: ExtractConfig) -> ShardExtractor:
    """A worker bound to the run's plan (what both runners do before the first shard)."""
    worker = ShardExtractor(cfg)
    worker.bind(plan(cfg, worker.describe()).manifest)
    return worker


# Pinned fidelity on these tiny teachers' features (relative MSE). Measured 2026-12-01 over all
# families: int8 2.4e-5..4.2e-5, fp16 4.1e-8..4.8e-8. Expected: int8 rounds to a per-token step
# of absmax/127, and these tokens' absmax is ~3-4 std, so step^2/12 / var ~ (3.5/127)^2/12 ~ 6e-5;
# fp16 keeps 11 significant bits, rounding error within 2^-11 of the value's binade, ~5e-8.
PINNED_REL_MSE = {"int8": 1e-4, "fp16": 1e-7}


def rel_mse(a, b):
    return float(((a - b) ** 2).sum() / max((b**2).sum(), 1e-30))


FAMILIES = ["eva", "convnext", "sam", "pix2struct", "dinov2", "siglip", "hf_vit", "timm_vit"]


@pytest.mark.parametrize("other", FAMILIES)
@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_cached_features_equal_a_direct_forward(tmp_path, tiny_specs, packed, other, codec):
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        codec=codec,
        batch_size=3,
        teachers=(tiny_specs["clip"], tiny_specs[other]),
        progress=False,
    )
    assert extract_in_process(cfg).ok
    cache = open_cache(cfg.out)
    keys = packed.keys_in_shard(0) + packed.keys_in_shard(1)
    batch = cache.read(keys)
    images = {k: Image.open(io.BytesIO(b)) for s in range(packed.num_shards) for k, b, _ in packed.iter_shard(s)}
    for name in ("clip", other):
        teacher = build_teacher(tiny_specs[name])  # loaded independently of the worker
        pixels = np.stack([preprocess_image(images[k], teacher.preprocess_spec) for k in keys])
        out = teacher.encode(torch.from_numpy(pixels))
        bound = PINNED_REL_MSE[codec]
        assert rel_mse(batch.features[name], out.tokens.numpy()) <= bound, name
        if name == "clip":  # the [CLS] state and attention row are stored exactly (float32)
            np.testing.assert_allclose(batch.cls_state, out.cls_state.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(batch.cls_attn, out.cls_attn.numpy(), rtol=1e-5, atol=1e-7)
    assert verify_cache(cfg.out, progress=False).ok


def _black_output(teacher):
    """The teacher on the released no-image input: a black 336 px square through its own
    preprocessing (written out here, independently of ``null_image_tensor``)."""
    pixels = preprocess_image(Image.new("RGB", (336, 336)), teacher.preprocess_spec)
    return teacher.encode(torch.from_numpy(pixels[None]))


def test_no_image_row_holds_the_teachers_output_for_the_black_input(tmp_path, tiny_specs, packed):
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        codec="fp16",
        teachers=(tiny_specs["clip"], tiny_specs["sam"]),
        progress=False,
    )
    assert extract_in_process(cfg).ok
    cache = open_cache(cfg.out)
    assert cache.manifest.null_input == "black" and cache.manifest.format_version == 2
    got = cache.read(["__no_image__"])
    for name in ("clip", "sam"):
        teacher = build_teacher(tiny_specs[name])
        spec = teacher.preprocess_spec
        mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (spec.mean, spec.std))
        assert np.abs(null_image_tensor(spec) + mean / std).max() <= 1e-6  # -mean/std everywhere, SAM too
        assert rel_mse(got.features[name], _black_output(teacher).tokens.numpy()) < 1e-6
        zero = teacher.encode(torch.zeros(1, 3, spec.resolution, spec.resolution)).tokens.numpy()
        assert rel_mse(got.features[name], zero) > 1e-3  # not the old all-zero input


def test_rewrite_null_row_fixes_an_old_cache_and_nothing_else(tmp_path, tiny_specs, packed):
    """A format 1 cache (zeros in its no-image row): ``--rewrite-null-row`` recomputes that row
    only; the data shards' markers and checksums are untouched; alpha stays as written (white)."""
    import json

    from cache import NULL_KEY, CacheWriter, ManifestMismatchError
    from pipeline.extract_null import rewrite_null_row
    from tests.cache.synth import downgrade_to_format_1

    cfg = ExtractConfig(
        packed=packed.root, out=str(tmp_path / "cache"), codec="fp16", teachers=(tiny_specs["clip"],), progress=False
    )
    assert extract_in_process(cfg).ok
    teacher = build_teacher(tiny_specs["clip"])
    m = open_cache(cfg.out).manifest
    res = m.teachers[0].preprocess.resolution
    old = teacher.encode(torch.zeros(1, 3, res, res))  # what format 1 stored
    writer = CacheWriter.open(cfg.out, m)
    writer.write_shard(  # replace=True: the committed black row becomes the old zero one
        m.num_shards,
        [NULL_KEY],
        {"clip": old.tokens.numpy()},
        old.cls_state.numpy(),
        old.cls_attn.numpy(),
        replace=True,
    )
    downgrade_to_format_1(cfg.out)
    markers = {
        n: (tmp_path / "cache" / "_commits" / n).read_text() for n in os.listdir(tmp_path / "cache" / "_commits")
    }
    with pytest.raises(ManifestMismatchError, match="--rewrite-null-row"):
        plan(cfg, ShardExtractor(cfg).describe())  # a plain resume is refused, naming the fix

    rewrite_null_row(cfg)
    cache = open_cache(cfg.out)
    assert cache.manifest.null_input == "black" and cache.manifest.format_version == 2
    assert cache.manifest.teachers[0].preprocess.alpha == "white"  # the data rows were composited
    assert rel_mse(cache.read([NULL_KEY]).features["clip"], _black_output(teacher).tokens.numpy()) < 1e-6
    null_marker = f"shard-{m.num_shards:05d}.json"
    for name, text in markers.items():
        now = (tmp_path / "cache" / "_commits" / name).read_text()
        assert (now == text) == (name != null_marker), name
    assert json.loads((tmp_path / "cache" / "_commits" / null_marker).read_text())["keys"] == [NULL_KEY]
    assert verify_cache(cfg.out, progress=False).ok


def test_corrupt_image_is_recorded_and_its_row_invalid(tmp_path, tiny_specs):
    packed = pack_crops(str(tmp_path / "data"), n=5, shard_size=4)
    bad = corrupt_member(packed, 0)
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        teachers=(tiny_specs["clip"], tiny_specs["convnext"]),
        progress=False,
    )
    summary = planned_worker(cfg).process(0)
    assert list(summary["failed"]) == [bad] and "cannot decode image" in summary["failed"][bad]
    cache = open_cache(cfg.out)
    assert not cache.is_valid(bad) and "cannot decode" in cache.failed()[bad]
    good = [k for k in packed.keys_in_shard(0) if k != bad]
    assert all(cache.is_valid(k) for k in good) and len(cache.read(good).keys) == 3


def test_nonfinite_teacher_output_marks_the_image_failed(tmp_path, tiny_specs, packed, monkeypatch):
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        teachers=(tiny_specs["clip"], tiny_specs["dinov2"]),
        progress=False,
    )
    worker = planned_worker(cfg)
    teacher = worker.teachers["dinov2"]
    real = teacher.encode

    def poisoned(pixels):
        out = real(pixels)
        out.tokens[0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(teacher, "encode", poisoned)
    summary = worker.process(0)
    first = packed.keys_in_shard(0)[0]
    assert summary["failed"] == {first: "teacher dinov2 produced NaN/Inf"}
    assert verify_cache(cfg.out, sample=0, progress=False).problems == [
        f"shard {s:05d} (data shard): not committed (extraction incomplete)" for s in [1]
    ] + ["shard 00002 (reserved no-image row): not committed (extraction incomplete)"]


def test_config_errors_name_the_field(tiny_specs):
    base = dict(packed="p", out="o", teachers=[tiny_specs["clip"].to_dict()])
    with pytest.raises(ValueError, match=r"extraction config: unknown field\(s\) \['batchsize'\]"):
        ExtractConfig.from_dict({**base, "batchsize": 3})
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        ExtractConfig.from_dict({**base, "codec": "int3"})
    with pytest.raises(ValueError, match="cls_teacher 'clip2'"):
        ExtractConfig.from_dict({**base, "cls_teacher": "clip2"})
    with pytest.raises(ValueError, match=r"missing \['out'\]"):
        ExtractConfig.from_dict({**base, "out": None}).require_io()
    cfg = ExtractConfig.from_dict({**base, "aspect": "pad"})
    assert all(t.aspect == "pad" for t in cfg.teachers)


def test_nonfinite_cls_row_marks_the_image_failed(tmp_path, tiny_specs, packed, monkeypatch):
    """A NaN in the CLS teacher's [CLS] state must not be silently zeroed into a valid row."""
    cfg = ExtractConfig(packed=packed.root, out=str(tmp_path / "cache"), teachers=(tiny_specs["clip"],), progress=False)
    worker = planned_worker(cfg)
    teacher = worker.teachers["clip"]
    real = teacher.encode

    def poisoned(pixels):
        out = real(pixels)
        out.cls_attn = out.cls_attn.clone()  # an inference tensor: poison a copy
        out.cls_attn[1, 3] = float("inf")
        return out

    monkeypatch.setattr(teacher, "encode", poisoned)
    summary = worker.process(0)
    second = packed.keys_in_shard(0)[1]
    assert summary["failed"] == {second: "teacher clip produced NaN/Inf in its [CLS] state or attention"}
    cache = open_cache(cfg.out)
    assert not cache.is_valid(second) and cache.is_valid(packed.keys_in_shard(0)[0])
    row = cache.read([second], allow_invalid=True)
    assert not row.cls_attn.any() and not row.cls_state.any() and not row.features["clip"].any()


def test_writer_refuses_nonfinite_cls_rows_of_valid_images(tmp_path):
    from cache import CacheWriter, get_codec
    from tests.cache.synth import make_manifest, shard_data

    manifest = make_manifest()
    writer = CacheWriter.create(str(tmp_path / "c"), manifest)
    data = shard_data(manifest, 0)
    data["cls_state"][2, 0] = float("nan")
    enc = {t.name: get_codec(t.codec).encode(data["features"][t.name]) for t in manifest.teachers}
    with pytest.raises(ValueError, match=r"cls_state produced NaN/Inf for image\(s\) \['img-000-02'\]"):
        writer.write_encoded(0, data["keys"], enc, data["cls_state"], data["cls_attn"])
    commit = writer.write_encoded(0, data["keys"], enc, data["cls_state"], data["cls_attn"], nonfinite="mark_failed")
    assert commit.failed == {"img-000-02": "cls_state produced NaN/Inf"}


def test_in_process_runner_resumes_and_reports_a_failing_shard(tmp_path, tiny_specs, packed, monkeypatch):
    """A failing shard is retried after an exponential, capped backoff (the other shards run
    meanwhile), then reported; a rerun does only what is missing."""
    import time

    cfg = ExtractConfig(
        packed=packed.root,
        out=str(tmp_path / "cache"),
        teachers=(tiny_specs["clip"],),
        progress=False,
        max_shard_retries=2,
        retry_backoff_s=0.3,
        retry_backoff_max_s=0.4,
    )
    assert [cfg.retry_delay(a) for a in (1, 2, 3)] == [0.3, 0.4, 0.4]
    worker = ShardExtractor(cfg)
    real, calls = worker.process, []

    def flaky(shard, replace=False):
        calls.append((shard, time.monotonic()))
        if shard == 1:
            raise OSError("disk hiccup")
        return real(shard, replace)

    monkeypatch.setattr(worker, "process", flaky)
    report = extract_in_process(cfg, worker)
    assert not report.ok and report.shards_failed == {1: "error: OSError: disk hiccup"}
    assert sorted(report.shards_done) == [0, 2] and [s for s, _ in calls] == [0, 1, 2, 1, 1]  # two retries of 1
    tries = [t for s, t in calls if s == 1]
    assert tries[1] - tries[0] >= 0.3 and tries[2] - tries[1] >= 0.4  # backed off, not burnt in a second
    monkeypatch.setattr(worker, "process", real)
    again = extract_in_process(cfg, worker)  # a rerun does only what is missing
    assert again.ok and sorted(again.shards_done) == [1] and again.shards_skipped == [0, 2]
    assert verify_cache(cfg.out, progress=False).ok


def test_dry_run_describes_plan_shapes_and_budget_without_weights(tmp_path, tiny_specs, packed):
    """``movekd extract --dry-run``: after one shard is committed, the description counts what is
    left and its per-image bytes equal what the cache really stores per row, with every weight file
    of the teachers deleted (so nothing can have been loaded)."""
    import shutil

    from cache.layout import array_specs
    from pipeline.extract_describe import describe_extraction, format_description

    teachers = tmp_path / "teachers"
    shutil.copytree(os.path.dirname(tiny_specs["clip"].source), teachers)
    specs = [dataclasses.replace(tiny_specs[n], source=str(teachers / os.path.basename(tiny_specs[n].source)))
             for n in ("clip", "eva", "convnext", "sam")]  # fmt: skip
    cfg = ExtractConfig(packed=packed.root, out=str(tmp_path / "cache"), teachers=tuple(specs), progress=False)
    planned_worker(cfg).process(0)
    manifest = open_cache(cfg.out).manifest
    for f in teachers.rglob("*.safetensors"):
        f.unlink()
    d = describe_extraction(cfg)
    assert (d.images, d.num_shards, d.committed, d.images_committed) == (6, 2, (0,), 4)
    row_bytes = sum(int(np.prod(s.per_row)) * np.dtype(s.dtype).itemsize for s in array_specs(manifest))
    assert d.bytes_per_image() == row_bytes
    text = format_description(d)
    assert "exists, 1 of 2 data shards committed; a run resumes" in text
    assert "6 unique images in 2 shards" in text and "1 shards committed, 1 to do" in text
    other = dataclasses.replace(cfg, codec="fp16")
    assert "DIFFERENT CONFIGURATION" in describe_extraction(other).cache_state


@pytest.mark.slow  # the CLI in a fresh interpreter
def test_cli_dry_run_of_a_released_preset_needs_no_download():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "extract", "--config", "movekd_v1_0_pretrain", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.split() and line.split()[0] in
            ("clip*", "eva", "convnext")}  # fmt: skip
    assert "24x24  1024" in rows["clip*"] and "64x64  1024" in rows["eva"] and "32x32  3072" in rows["convnext"]
    assert "eva_vitdet  (not set)" in rows["eva"]  # the released EVA-02 ViTDet, whose checkpoint is not set yet
    assert "a real run needs the checkpoint: --set teachers.1.source=PATH (eva)" in out.stdout
    assert "packed is not set" in out.stdout


def test_online_mode_feeds_the_black_input_for_text_only_rows(tiny_specs):
    """``--online-teachers`` computes a text-only row's targets from the same black input."""
    from cache import NULL_KEY
    from jobs.online_teachers import OnlineTargets

    teacher = build_teacher(tiny_specs["clip"])
    collate = lambda samples: {"keys": [s["key"] for s in samples], "targets": {}}  # noqa: E731
    online = OnlineTargets({"clip": teacher}, images=lambda key: None, collate=collate, cls_teacher="clip")
    batch = online([{"key": NULL_KEY}])
    want = _black_output(teacher)
    assert torch.equal(batch["targets"]["clip"], want.tokens.float())
    assert torch.equal(batch["cls_attn"], want.cls_attn.float())
