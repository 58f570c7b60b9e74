"""The inspection CLI on synthetic caches: inspect (table and JSON), verify (exit codes 0/1/2),
show, stats (checked against numpy through FeatureCache.channel_stats), attn (a real PNG, with
and without an image underneath), one-line errors, and the two entry points as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache import NULL_KEY, CacheManifest, CacheWriter, cli, open_cache
from tests.cache import synth

ROOT = Path(__file__).resolve().parents[2]
RAW_BF16 = 16 * 64 * 2 + 64 * 32 * 2 + 4 * 64 * 2  # tokens * channels * 2 bytes, summed over teachers


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def own_cache(tmp_path, manifest):
    path = tmp_path / "c"
    synth.build_cache(path, manifest)
    return path


def _truncate(path, rel="teachers/eva/values/c/1/0/0") -> str:
    file = Path(path) / rel
    file.write_bytes(file.read_bytes()[:100])
    return rel


# -- inspect -------------------------------------------------------------------------------------


def test_inspect_table(capsys, built_cache):
    code, out, err = run(capsys, "inspect", built_cache[0])
    assert code == 0 and err == ""
    for text in (
        "movekd-feature-cache v2",
        "3/3 committed",
        "no-image row committed",
        "10 valid, 1 failed",
        "toy (fingerprint sha256:toy-dataset)",
        "clip*",
        "bf16",
        "int8",
        "int4",
        "area from 3x3",
        "56 shortest_edge, bicubic, crop center, aspect square",
        "x raw bf16",
    ):
        assert text in out, text


def test_inspect_json(capsys, built_cache):
    path, manifest = built_cache
    code, out, _ = run(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["images"] == {"valid": 10, "failed": 1, "total": 11}
    assert info["shards"] == {"committed": 3, "total": 3, "null_row_committed": True}
    assert (
        info["manifest"]["format_version"] == 2
        and info["manifest"]["null_input"] == "black"
        and info["manifest"]["dataset_name"] == "toy"
    )
    assert info["manifest"]["created"] == manifest.created and info["manifest"]["package_version"]
    on_disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    assert info["bytes_on_disk"] == on_disk and info["raw_bf16_bytes_per_image"] == RAW_BF16
    image_rows = sum(_data_file_bytes(Path(path), {0, 1, 2}).values())  # not the no-image row, not metadata
    assert info["ratio_to_raw_bf16"] == pytest.approx(image_rows / 11 / RAW_BF16)
    eva = {t["name"]: t for t in info["teachers"]}["eva"]
    assert (eva["tokens"], eva["grid"], eva["channels"], eva["codec"]) == (64, [8, 8], 32, "int8")
    assert eva["preprocess"]["resolution"] == 112 and not eva["is_cls_teacher"]
    assert 0 < eva["bytes_on_disk"] < on_disk and eva["raw_bf16_bytes_per_image"] == 64 * 32 * 2


def test_inspect_incomplete_cache(capsys, tmp_path, manifest):
    synth.build_cache(tmp_path / "c", manifest, shards=[2], null=False)
    code, out, _ = run(capsys, "inspect", tmp_path / "c", "--json")
    info = json.loads(out)
    assert info["shards"] == {"committed": 1, "total": 3, "null_row_committed": False}
    assert info["images"] == {"valid": 3, "failed": 0, "total": 3}
    assert "NOT committed" in run(capsys, "inspect", tmp_path / "c")[1]


def _data_file_bytes(root: Path, shards) -> dict[str, int]:
    """Bytes of every array's zarr shard files for ``shards``, per array path, read off the disk."""
    out: dict[str, int] = {}
    for f in root.rglob("*"):
        rel = f.relative_to(root).as_posix()
        head, sep, tail = rel.rpartition("/c/")
        if f.is_file() and sep and int(tail.split("/")[0]) in shards:
            out[head] = out.get(head, 0) + f.stat().st_size
    return out


def test_inspect_bytes_per_image_counts_the_image_rows_only(capsys, own_cache, manifest):
    """bytes/img = the data shards' array files / rows; the no-image row, zarr.json, markers and
    reports are shown apart, and the parts add up to the bytes on disk."""
    (own_cache / "_reports").mkdir()
    (own_cache / "_reports" / "extract-20261203-075000.json").write_text("{}" + " " * 20000)
    code, out, _ = run(capsys, "inspect", own_cache, "--json")
    info = json.loads(out)
    files = sum(f.stat().st_size for f in own_cache.rglob("*") if f.is_file())
    image_rows = _data_file_bytes(own_cache, {0, 1, 2})
    null_row = _data_file_bytes(own_cache, {3})
    parts = info["bytes"]
    assert code == 0 and sum(parts.values()) == info["bytes_on_disk"] == files
    assert parts["image_rows"] == sum(image_rows.values()) and parts["no_image_row"] == sum(null_row.values())
    assert parts["reports"] == 20002 and parts["uncommitted_shards"] == 0
    assert parts["metadata"] == files - sum(image_rows.values()) - sum(null_row.values()) - 20002
    assert info["bytes_per_image"] == pytest.approx(sum(image_rows.values()) / 11)
    assert info["ratio_to_raw_bf16"] == pytest.approx(sum(image_rows.values()) / 11 / RAW_BF16)
    per_teacher = {t["name"]: t for t in info["teachers"]}
    for name, t in per_teacher.items():
        mine = sum(v for k, v in image_rows.items() if k.startswith(f"teachers/{name}/"))
        assert t["bytes_image_rows"] == mine and t["bytes_per_image"] == pytest.approx(mine / 11), name
        assert t["bytes_no_image_row"] == sum(v for k, v in null_row.items() if k.startswith(f"teachers/{name}/"))
    aux = sum(v for k, v in image_rows.items() if k.startswith("aux/"))
    assert info["aux"]["bytes_image_rows"] == aux > 0
    assert sum(t["bytes_per_image"] for t in per_teacher.values()) + aux / 11 == pytest.approx(info["bytes_per_image"])
    text = run(capsys, "inspect", own_cache)[1]
    assert "no-image row" in text and "metadata/reports" in text and "per image" in text


def test_inspect_counts_uncommitted_shard_files_apart(capsys, tmp_path, manifest):
    synth.build_cache(tmp_path / "c", manifest, shards=[0, 1, 2], null=True)
    (tmp_path / "c" / "_commits" / "shard-00002.json").unlink()  # shard 2's files stay, invisible
    info = json.loads(run(capsys, "inspect", tmp_path / "c", "--json")[1])
    assert info["bytes"]["uncommitted_shards"] == sum(_data_file_bytes(tmp_path / "c", {2}).values()) > 0
    assert info["bytes"]["image_rows"] == sum(_data_file_bytes(tmp_path / "c", {0, 1}).values())
    assert info["bytes_per_image"] == pytest.approx(info["bytes"]["image_rows"] / 8)
    assert "uncommitted" in run(capsys, "inspect", tmp_path / "c")[1]


def test_inspect_parts_add_up_on_a_memory_store(capsys, memory_url, manifest):
    synth.build_cache(memory_url, manifest)
    info = json.loads(run(capsys, "inspect", memory_url, "--json")[1])
    assert sum(info["bytes"].values()) == info["bytes_on_disk"] > info["bytes"]["image_rows"] > 0
    assert info["bytes"]["no_image_row"] > 0 and info["bytes_per_image"] == pytest.approx(
        info["bytes"]["image_rows"] / 11
    )


def test_inspect_of_an_empty_cache_has_no_bytes_per_image(capsys, tmp_path, manifest):
    synth.build_cache(tmp_path / "c", manifest, shards=[], null=False)
    info = json.loads(run(capsys, "inspect", tmp_path / "c", "--json")[1])
    assert info["bytes_per_image"] is None and info["bytes"]["image_rows"] == 0 and info["bytes"]["metadata"] > 0
    assert "per image -" in run(capsys, "inspect", tmp_path / "c")[1]


WIDTH = 100


def _widest(text: str) -> int:
    lines = text.splitlines()
    assert lines[0].startswith("cache ")  # the location is printed whole, however long
    return max(len(line) for line in lines[1:])


def test_inspect_table_fits_100_columns(capsys, tmp_path):
    from cache.summary import format_inspect, inspect_cache

    path = tmp_path / "release"
    CacheWriter.create(path, synth.release_like_manifest())  # array metadata only: no rows written
    info = inspect_cache(open_cache(path))
    for t in info["teachers"]:  # per-image sizes at the real scale (hundreds of KiB to MiB)
        t["bytes_per_image"], t["ratio_to_raw_bf16"] = 0.31 * t["raw_bf16_bytes_per_image"], 0.31
    info["images"] = {"valid": 558127, "failed": 873, "total": 559000}
    info["bytes_per_image"], info["ratio_to_raw_bf16"] = 6.89e6, 0.343
    info["bytes"] = {k: 3.85e12 for k in info["bytes"]}
    text = format_inspect(info)
    assert _widest(text) <= WIDTH, "\n" + text
    for word in (
        "pix2struct",
        "eva_vitdet",
        "int8_channel",
        "int4_g64",
        "area from 48x48",
        "timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k",
        "last block output [B, H, W, C] (no final norm, no CLS token), tokens row-major",
        "1024 longest_edge, bilinear, pad bottom_right, aspect pad",
    ):
        assert word in text, word  # nothing dropped: long values are wrapped, never cut
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and _widest(out) <= WIDTH
    full = json.loads(run(capsys, "inspect", path, "--json")[1])
    eva = {t["name"]: t for t in full["teachers"]}["eva"]
    assert eva["layer"].endswith("tokens row-major") and eva["source"].endswith(".pth") and eva["preprocess"]


def test_inspect_of_a_format_1_cache_fits_100_columns(capsys, tmp_path, manifest):
    synth.build_cache(tmp_path / "c", manifest)
    synth.downgrade_to_format_1(str(tmp_path / "c"))  # adds the --rewrite-null-row hint
    out = run(capsys, "inspect", tmp_path / "c")[1]
    assert "--rewrite-null-row" in out and _widest(out) <= WIDTH


# -- keys ----------------------------------------------------------------------------------------


def test_keys_lists_every_image_in_row_order(capsys, built_cache):
    path, manifest = built_cache
    code, out, err = run(capsys, "keys", path)
    every = [k for s in range(manifest.num_shards) for k in synth.shard_keys(manifest, s)]
    assert code == 0 and err == "" and out == "".join(k + "\n" for k in every)  # failed ones too
    assert NULL_KEY not in out  # the no-image row is not an image
    code, out, _ = run(capsys, "keys", path, "--failed")
    assert code == 0 and out == "img-001-01\timage decode error: truncated JPEG\n"
    code, out, _ = run(capsys, "keys", path, "--shard", "2")
    assert code == 0 and out.split() == synth.shard_keys(manifest, 2)
    code, out, _ = run(capsys, "keys", path, "--shard", "0", "--failed")
    assert code == 0 and out == ""


def test_keys_errors(capsys, tmp_path, manifest):
    synth.build_cache(tmp_path / "c", manifest, shards=[0], null=True)
    code, out, err = run(capsys, "keys", tmp_path / "c", "--shard", "1")
    assert code == 2 and out == "" and "shard 1 is not committed" in err and len(err.splitlines()) == 1
    code, _, err = run(capsys, "keys", tmp_path / "c", "--shard", "3")
    assert code == 2 and "0..2" in err and NULL_KEY in err  # shard 3 is the no-image row's
    code, _, err = run(capsys, "keys", tmp_path / "missing")
    assert code == 2 and "no cache at" in err


def test_keys_stops_quietly_when_the_pipe_closes(tmp_path):
    """`movekd cache keys C | head -1`: the reader goes away; no traceback, no error line."""
    manifest = CacheManifest(
        teachers=[synth.make_teacher("t", (1, 1), 2, "bf16")],
        num_shards=1,
        shard_size=6000,
        dataset_fingerprint="sha256:many",
    )
    keys = [f"image-{i:08d}" for i in range(6000)]  # 90 KB of output: more than a pipe holds
    CacheWriter.create(tmp_path / "c", manifest).write_shard(0, keys, {"t": np.ones((6000, 1, 2), np.float32)})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cache", "keys", str(tmp_path / "c")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"image-00000000\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == "", err


# -- verify --------------------------------------------------------------------------------------


def test_verify_exit_codes(capsys, own_cache, tmp_path):
    code, out, err = run(capsys, "verify", own_cache, "--no-progress")
    assert code == 0 and out.startswith("OK: 4/4 shards committed") and err == ""
    code, out, _ = run(capsys, "verify", own_cache, "--json", "--sample", "3", "--no-progress")
    assert code == 0 and json.loads(out)["rows_sampled"] == 3
    rel = _truncate(own_cache)
    code, out, _ = run(capsys, "verify", own_cache, "--no-progress")
    assert code == 1 and "FAILED" in out
    assert any(line.startswith("PROBLEM shard 00001") and rel in line for line in out.splitlines())
    code, out, err = run(capsys, "verify", tmp_path / "missing")
    assert code == 2 and out == "" and err.startswith("error: no cache at") and len(err.splitlines()) == 1


def test_verify_reports_a_bit_flip(capsys, own_cache, manifest):
    rel = "teachers/clip/values/c/2/0/0"
    synth.flip_payload_bit(own_cache / rel, manifest.shard_size)
    code, out, _ = run(capsys, "verify", own_cache, "--no-progress", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert any("shard 00002" in p and rel in p for p in report["problems"])


def test_verify_incomplete_cache_exits_1(capsys, tmp_path, manifest):
    synth.build_cache(tmp_path / "c", manifest, shards=[0, 1], null=True)
    code, out, _ = run(capsys, "verify", tmp_path / "c", "--no-progress")
    assert code == 1 and "PROBLEM shard 00002 (data shard): not committed" in out


def test_progress_bars_are_drawn_unless_disabled(capsys, built_cache):
    assert "verify shards" in run(capsys, "verify", built_cache[0])[2]
    assert run(capsys, "verify", built_cache[0], "--no-progress")[2] == ""


# -- show ----------------------------------------------------------------------------------------


def test_show_matches_numpy(capsys, built_cache):
    path, manifest = built_cache
    code, out, _ = run(capsys, "show", path, "img-002-01", "--json")
    info = json.loads(out)
    batch = open_cache(path).read(["img-002-01"])
    x = batch.features["eva"][0].astype(np.float64)
    eva = info["teachers"]["eva"]
    assert code == 0 and eva["shape"] == [64, 32] and eva["codec"] == "int8"
    for name, value in (
        ("mean", x.mean()),
        ("std", x.std()),
        ("min", x.min()),
        ("max", x.max()),
        ("absmax", np.abs(x).max()),
        ("token_l2_mean", np.linalg.norm(x, axis=1).mean()),
    ):
        assert eva[name] == pytest.approx(value, rel=1e-9), name
    attn = batch.cls_attn[0].astype(np.float64)
    p = attn / attn.sum()
    assert info["cls_attn"]["entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
    assert info["cls_attn"]["max"] == pytest.approx(attn.max())
    assert info["cls_attn"]["argmax_rc"] == list(divmod(int(attn.argmax()), synth.CLS_GRID[1]))


def test_show_table_and_key_errors(capsys, built_cache):
    path = built_cache[0]
    code, out, _ = run(capsys, "show", path, "img-000-00")
    assert code == 0 and "eva" in out and "64x32" in out and "[CLS] attention (clip, grid 4x4)" in out
    assert run(capsys, "show", path, NULL_KEY)[0] == 0
    code, out, err = run(capsys, "show", path, "img-001-01")
    assert code == 2 and out == "" and "failed extraction" in err and "truncated JPEG" in err
    code, _, err = run(capsys, "show", path, "no-such-image")
    assert code == 2 and err.startswith("error: 'no-such-image' is not an image key of ") and len(err.splitlines()) == 1


# -- stats ---------------------------------------------------------------------------------------


def test_stats_stored_values_match_numpy(capsys, own_cache):
    code, out, _ = run(capsys, "stats", own_cache, "--teachers", "eva", "--no-progress")
    assert code == 0 and "eva" in out and "wrote stats.json" in out
    code, _, _ = run(capsys, "stats", own_cache, "--teachers", "clip,convnext", "--no-progress")
    cache = open_cache(own_cache)
    valid = [k for k in cache.keys() if cache.is_valid(k) and k != NULL_KEY]
    assert len(valid) == 10
    feats = cache.read(valid).features
    for name in ("eva", "clip", "convnext"):  # a later subset keeps the earlier teachers' statistics
        x = feats[name].reshape(-1, feats[name].shape[-1]).astype(np.float64)
        stats = cache.channel_stats(name)
        np.testing.assert_allclose(stats["mean"], x.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["std"], x.std(axis=0), rtol=1e-5)


def test_stats_errors(capsys, own_cache, tmp_path, manifest):
    code, _, err = run(capsys, "stats", own_cache, "--teachers", "eva,sam")
    assert code == 2 and "unknown teacher(s) ['sam']" in err
    empty = tmp_path / "empty"
    synth.build_cache(empty, manifest, shards=[], null=False)
    code, _, err = run(capsys, "stats", empty)
    assert code == 2 and "nothing to compute" in err


# -- attn ----------------------------------------------------------------------------------------


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA")
        assert 300 <= im.width <= 2000 and 300 <= im.height <= 2000
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_attn_heatmap_with_and_without_image(capsys, built_cache, tmp_path):
    path = built_cache[0]
    code, out, _ = run(capsys, "attn", path, "img-000-02", "--out", tmp_path / "plain.png")
    assert code == 0 and "wrote" in out
    plain = _png(tmp_path / "plain.png")
    assert plain.std() > 10 and len(np.unique(plain.reshape(-1, 3), axis=0)) > 20  # not blank
    yy, xx = np.mgrid[0:90, 0:160]
    picture = np.stack([xx * 255 // 159, yy * 255 // 89, np.full_like(xx, 60)], axis=-1).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    code, _, _ = run(
        capsys,
        "attn",
        path,
        "img-000-02",
        "--out",
        tmp_path / "over.png",
        "--image",
        tmp_path / "photo.png",
        "--alpha",
        "0.4",
    )
    over = _png(tmp_path / "over.png")
    assert code == 0 and over.shape == plain.shape and np.abs(over - plain).mean() > 1


def _attn_cache(path, rows: dict[str, np.ndarray]):
    """A cache whose shard 0 holds the given [CLS] attention rows (4x4 grid) under their keys."""
    manifest = synth.make_manifest(num_shards=1)
    keys = list(rows)
    data = synth.shard_data(manifest, 0)
    features = {t: x[: len(keys)] for t, x in data["features"].items()}
    cls_attn = np.stack([rows[k] for k in keys]).astype(np.float32)
    CacheWriter.create(path, manifest).write_shard(0, keys, features, data["cls_state"][: len(keys)], cls_attn)


def _heat_pixels(png, fig) -> np.ndarray:
    """The PNG's pixels inside the heatmap (a 4-pixel margin inside the image's box)."""
    image = _png(png)
    box = fig.axes[0].images[-1].get_window_extent()  # display pixels, origin bottom left
    height = image.shape[0]
    x0, x1 = int(np.ceil(box.x0)) + 4, int(np.floor(box.x1)) - 4
    y0, y1 = height - int(np.floor(box.y1)) + 4, height - int(np.ceil(box.y0)) - 4
    assert x1 - x0 > 100 and y1 - y0 > 100
    return image[y0:y1, x0:x1].reshape(-1, 3)


def test_attn_colour_scale_is_relative_to_uniform(capsys, tmp_path):
    """A near-uniform row (every token within 1% of 1/N) draws as one flat colour; a peaked row
    spreads over the scale; the colour bar is in multiples of uniform and says what 1/N is."""
    rng = np.random.default_rng(0)
    flat = np.full(16, 1 / 16) * (1 + 0.01 * rng.uniform(-1, 1, 16))
    peaked = np.full(16, 0.5 / 15)
    peaked[5] = 0.5
    _attn_cache(tmp_path / "c", {"flat": flat / flat.sum(), "peaked": peaked})
    spread = {}
    for key, heat in (("flat", flat / flat.sum()), ("peaked", peaked)):
        code, _, _ = run(capsys, "attn", tmp_path / "c", key, "--out", tmp_path / f"{key}.png")
        fig = cli.draw_attention(heat.reshape(4, 4), str(tmp_path / f"again-{key}.png"), key)
        pixels = _heat_pixels(tmp_path / f"{key}.png", fig)
        spread[key] = int((pixels.max(axis=0) - pixels.min(axis=0)).max())
        assert code == 0
    assert spread["flat"] <= 6 and spread["peaked"] >= 100, spread
    bar = fig.axes[1]
    low, high = sorted(bar.get_ylim())
    assert "x uniform" in bar.get_ylabel() and "1/N = 0.0625" in bar.get_ylabel()
    assert low * high == pytest.approx(1, rel=1e-6) and high >= 2  # symmetric around uniform (log scale)
    assert high == pytest.approx(8.0, rel=0.05)  # the peak: 0.5 / (1/16) = 8 x uniform
    title = fig.axes[0].get_title()
    assert "8.00x" in title and "0.53x" in title and "entropy" in title


def test_attention_range_in_show(capsys, built_cache):
    code, out, _ = run(capsys, "show", built_cache[0], "img-000-00", "--json")
    a = json.loads(out)["cls_attn"]
    attn = open_cache(built_cache[0]).read(["img-000-00"]).cls_attn[0].astype(np.float64)
    assert a["max_x_uniform"] == pytest.approx(attn.max() / attn.mean(), rel=1e-9)
    assert a["min_x_uniform"] == pytest.approx(attn.min() / attn.mean(), rel=1e-9)
    assert "x uniform" in run(capsys, "show", built_cache[0], "img-000-00")[1]


def test_teacher_view_follows_the_preprocess_spec():
    from cache.manifest import PreprocessSpec

    img = Image.new("RGB", (160, 90), (10, 200, 30))
    assert cli.teacher_view(img, PreprocessSpec(resolution=56)).shape == (56, 56, 3)
    sam = PreprocessSpec(resolution=64, resize="longest_edge", crop="none", pad="bottom_right")
    view = cli.teacher_view(img, sam)
    # SAM pads with zeros after normalisation: un-normalised, the padding shows as the mean colour
    mean_rgb = np.round(np.asarray(sam.mean) * 255).astype(np.uint8)
    assert view.shape == (64, 64, 3) and (view[40:, :, :] == mean_rgb).all()
    assert np.abs(view[:30].astype(int) - (10, 200, 30)).max() <= 2  # the image itself, top-left
    pad = cli.teacher_view(img, PreprocessSpec(resolution=32, aspect="pad"))
    assert pad.shape == (32, 32, 3) and tuple(pad[0, 0]) != (10, 200, 30)  # mean-colour border


def test_attn_errors(capsys, built_cache, tmp_path, manifest):
    path = built_cache[0]
    out = tmp_path / "x.png"
    assert run(capsys, "attn", path, "img-001-01", "--out", out)[0] == 2
    code, _, err = run(capsys, "attn", path, "img-000-00", "--out", out, "--alpha", "3")
    assert code == 2 and "--alpha" in err
    (tmp_path / "not-an-image.jpg").write_text("hello")
    code, _, err = run(capsys, "attn", path, "img-000-00", "--out", out, "--image", tmp_path / "not-an-image.jpg")
    assert code == 2 and "cannot read image" in err
    synth.build_cache(tmp_path / "nocls", synth.make_manifest(cls=False), shards=[0], null=False)
    code, _, err = run(capsys, "attn", tmp_path / "nocls", "img-000-00", "--out", out)
    assert code == 2 and "has no cls teacher" in err and not out.exists()


# -- errors and entry points ---------------------------------------------------------------------


def test_wrong_version_is_one_line_exit_2(capsys, own_cache):
    meta = json.loads((own_cache / "zarr.json").read_text())
    meta["attributes"]["movekd"]["format_version"] = 99
    (own_cache / "zarr.json").write_text(json.dumps(meta))
    for command in (["inspect"], ["verify"], ["show", None], ["stats"]):
        argv = [command[0], own_cache] + (["img-000-00"] if len(command) > 1 else [])
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (command, err)
        assert "format version 99 is not supported" in err and "Traceback" not in err


def test_every_option_has_help():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "cache_command").choices
    assert set(commands) == {"inspect", "verify", "keys", "show", "attn", "stats"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name}: {action.dest} has no help text"


def _all_helps(parser) -> dict[str, str]:
    out = {"": parser.format_help()}
    commands = next(a for a in parser._actions if a.dest == "cache_command").choices
    out.update({name: sub.format_help() for name, sub in commands.items()})
    return out


def test_help_texts_show_no_markup():
    """Helps are read in a terminal: no reStructuredText double backticks in them."""
    import argparse

    from jobs import cache_cli

    movekd = argparse.ArgumentParser(prog="movekd")
    cache_parser = cache_cli.add_parser(movekd.add_subparsers())
    for prog, parser in (("python -m cache", cli.build_parser()), ("movekd cache", cache_parser)):
        for name, text in _all_helps(parser).items():
            assert "``" not in text, f"{prog} {name} --help:\n{text}"


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_python_m_cache_and_movekd_cache_entry_points(own_cache):
    res = _cli("-m", "cache", "--help")
    assert res.returncode == 0 and all(c in res.stdout for c in ("inspect", "verify", "show", "attn", "stats"))
    res = _cli("-m", "jobs.cli", "cache", "--help")
    assert res.returncode == 0 and "usage: movekd cache" in res.stdout and "verify" in res.stdout
    res = _cli("-m", "jobs.cli", "cache", "verify", "--help")
    assert res.returncode == 0 and "--sample N" in res.stdout and "--no-progress" in res.stdout
    res = _cli("-m", "jobs.cli", "cache", "inspect", own_cache, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["images"]["failed"] == 1
    rel = _truncate(own_cache)
    res = _cli("-m", "jobs.cli", "cache", "verify", own_cache, "--no-progress")
    assert res.returncode == 1 and rel in res.stdout and "shard 00001" in res.stdout
    res = _cli("-m", "cache", "show", own_cache.parent / "nope", "k")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "no cache at" in res.stderr
