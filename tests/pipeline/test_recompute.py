"""``movekd cache verify --recompute N``: the teachers re-run on sampled images against the cache.

Real files throughout: tiny random-weight teachers saved to disk and loaded through the real
loaders, a real pack, a cache written by the in-process extraction runner. A good cache passes
bit-identically; a cache whose teacher weights are not the loaded ones, and a cache whose
features were written with another preprocessing (checksums and markers valid, so plain
``verify`` passes), fail with the worst image named. One test runs the real command in a fresh
process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cache import NULL_KEY, CacheWriter, open_cache, verify_cache
from cache.preprocess import preprocess_image
from jobs.cli import build_parser, main
from pipeline.extract import extract_in_process
from pipeline.extract_config import ExtractConfig
from pipeline.packed_dataset import PackedDataset
from pipeline.recompute import Recompute, recompute_check
from pipeline.teachers import build_teacher
from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers.datasets import pack_crops

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return make_tiny_teachers(tmp_path_factory.mktemp("tiny"), families=["clip", "dinov2"])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_crops(str(tmp_path_factory.mktemp("data")), n=6, shard_size=4)


def extract(out, packed, teachers) -> ExtractConfig:
    cfg = ExtractConfig(
        packed=packed.root,
        out=str(out),
        teachers=tuple(teachers),
        codec="int8",
        codecs={"dinov2": "bf16"} if any(t.name == "dinov2" for t in teachers) else {},
        batch_size=3,
        progress=False,
    )
    assert extract_in_process(cfg).ok
    return cfg


@pytest.fixture(scope="module")
def good(tmp_path_factory, packed, teachers) -> ExtractConfig:
    """A cache extracted with clip (int8, + [CLS] state/attention) and dinov2 (bf16). Read-only."""
    return extract(tmp_path_factory.mktemp("good") / "cache", packed, teachers)


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed
    code = main(["cache", "verify", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def write_config(path: Path, teachers, packed) -> Path:
    path.write_text(
        yaml.safe_dump({"kind": "extract", "packed": packed.root, "teachers": [t.to_dict() for t in teachers]})
    )
    return path


def test_a_good_cache_recomputes_bit_identically(capsys, good):
    code, out, err = cli(capsys, good.out, "--recompute", 4, "--json")
    assert code == 0, out + err
    report = json.loads(out)
    rc = report["recompute"]
    assert report["ok"] and rc["ok"] and rc["problems"] == [] and rc["device"] == "cpu"
    assert len(rc["keys"]) == 5 and rc["keys"][-1] == NULL_KEY  # 4 images + the no-image row
    assert [c["array"] for c in rc["checks"]] == ["clip", "dinov2", "aux/cls_state", "aux/cls_attn"]
    assert [c["bound"] for c in rc["checks"]] == [1e-4, 2e-5, 1e-6, 1e-6]
    for c in rc["checks"]:  # same device, dtype and code: the same bytes
        assert c["images"] == c["identical"] == 5 and c["worst_rel_mse"] == 0.0 and c["ok"], c
    code, out, _ = cli(capsys, good.out, "--recompute", 100, "--seed", 3)  # more than the cache holds
    assert code == 0 and "recompute: 6 image(s) + the no-image row (seed 3)" in out
    assert "recompute OK" in out and "FAIL" not in out


@pytest.mark.slow  # a fresh interpreter (torch, transformers): ~7 s
def test_other_weights_fail_in_a_real_process(tmp_path, good, teachers, packed):
    """The same architecture, another checkpoint: the command names the fingerprint and exits 1."""
    other_clip = make_tiny_teachers(tmp_path / "other", families=["clip"], seed=1)[0]
    config = write_config(tmp_path / "other.yaml", [other_clip, teachers[1]], packed)
    res = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "cache", "verify", good.out, "--recompute", "3", "--config", config]
        + ["--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert out.startswith("OK: 3/3 shards committed")  # the checksums are fine
    assert "PROBLEM teacher clip: the loaded weights are not the ones that wrote this cache" in out
    assert f"NOTE teacher clip: loaded from {other_clip.source}" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()[:1] in (["clip"], ["dinov2"])}
    assert rows["clip"][-1] == "FAIL" and float(rows["clip"][-3]) > 0.1  # rel. MSE of unrelated features
    assert rows["dinov2"][-1] == "ok" and rows["dinov2"][4] == "4"  # 3 images + no-image row, identical
    assert "recompute FAILED" in out


def rewrite_with_bilinear(cfg: ExtractConfig, out: Path, shard: int) -> list[str]:
    """Rewrite ``shard`` of the cache at ``out`` with the teachers run on bilinear-resized inputs
    (the manifest still says bicubic): markers and checksums are valid. Returns its keys."""
    cache = open_cache(out)
    keys = cache.commits[shard].keys
    images = [Image.open(io.BytesIO(data)) for _, data, _ in PackedDataset(cfg.packed).read_images(keys)]
    feats, cls = {}, None
    for spec in cfg.teachers:
        teacher = build_teacher(spec)
        pre = dataclasses.replace(teacher.preprocess_spec, interpolation="bilinear")
        result = teacher.encode(torch.from_numpy(np.stack([preprocess_image(im, pre) for im in images])))
        feats[spec.name] = result.tokens.numpy()
        if spec.name == "clip":
            cls = (result.cls_state.numpy(), result.cls_attn.numpy())
    CacheWriter.open(out, cache.manifest).write_shard(shard, keys, feats, *cls, replace=True)
    return keys


def test_features_written_with_another_preprocessing_fail_with_the_worst_image(tmp_path, good):
    out = tmp_path / "cache"
    shutil.copytree(good.out, out)
    bad_keys = rewrite_with_bilinear(good, out, shard=0)
    assert verify_cache(out, progress=False).ok  # checksums cannot see it

    report = recompute_check(out, 6, progress=False)  # every image of the cache
    assert not report.ok and len(report.keys) == 7
    for name in ("clip", "dinov2", "aux/cls_state", "aux/cls_attn"):
        check = report.check(name)
        assert check.worst_key in bad_keys and check.over == len(bad_keys), check
        assert check.worst_error > 3 * check.bound, check
        assert check.identical == 7 - len(bad_keys), check  # shard 1 and the no-image row are untouched
    assert any(p.startswith("clip (int8): 4 of 7 image(s) differ") for p in report.problems), report.problems
    assert "recompute FAILED" in report.format()
    # The bound is the codec's, plus --tolerance: a tolerance as large as the error hides it.
    assert recompute_check(out, 6, progress=False, tolerance=1.0).ok


def test_moved_checkpoints_need_config_and_pass_with_it(capsys, tmp_path, packed):
    tiny = make_tiny_teachers(tmp_path / "tiny", families=["clip"])
    cfg = extract(tmp_path / "cache", packed, tiny)
    shutil.move(tmp_path / "tiny", tmp_path / "moved")

    code, out, err = cli(capsys, cfg.out, "--recompute", 2)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint {tiny[0].source} does not exist here; pass --config" in err

    moved = dataclasses.replace(tiny[0], source=str(tmp_path / "moved" / "clip"))
    config = write_config(tmp_path / "moved.yaml", [moved], packed)
    code, out, err = cli(capsys, cfg.out, "--recompute", 2, "--config", config)
    assert code == 0, out + err
    assert f"teachers from --config {config}" in out and f"NOTE teacher clip: loaded from {moved.source}" in out
    assert "recompute OK" in out


def test_a_moved_pack_is_named_and_packed_overrides_it(capsys, tmp_path, good):
    code, _, err = cli(capsys, good.out, "--recompute", 2, "--packed", tmp_path / "nowhere")
    assert code == 2 and "cannot read the images to recompute" in err and "--packed DIR" in err
    report = Recompute(good.out, packed=good.packed).run(2, seed=1)
    assert report.ok and report.packed == good.packed


def test_option_errors_are_one_line_exit_2(capsys, good):
    for argv, msg in [
        (["--config", "tiny"], "--config: only with --recompute N"),
        (["--tolerance", "1e-3", "--device", "cpu"], "--device, --tolerance: only with --recompute N"),
        (["--recompute", "0"], "--recompute needs a number of images >= 1"),
        (["--recompute", "1", "--tolerance", "-1"], "--tolerance must be >= 0"),
    ]:
        code, out, err = cli(capsys, good.out, *argv)
        assert code == 2 and out == "" and msg in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_every_verify_option_has_help():
    parser = build_parser({"cache": "jobs.cache_cli"})
    cache = next(a for a in parser._actions if a.dest == "verb").choices["cache"]
    verify = next(a for a in cache._actions if a.dest == "cache_command").choices["verify"]
    dests = {a.dest for a in verify._actions}
    assert {"recompute", "config", "packed", "device", "tolerance"} <= dests
    assert all(a.help for a in verify._actions), [a.dest for a in verify._actions if not a.help]
