"""Packing odd inputs (issue 11 item 8): decompression bombs, animated images, multi-image rows.

Each was silent or misreported before: a bomb warning named no file and the image was packed
(or, past twice Pillow's threshold, reported as "unreadable"); an animated GIF was packed with no
word that teachers see frame 1; a LLaVA-OneVision row with a list of images was "path rejected".
Pillow's threshold is lowered in the test (monkeypatch) so that bombs stay small files.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main as cli_main
from jobs.image_source import PackedImageSource, records_from_packed
from pipeline.packed_dataset import SKIPPED, PackedDataset
from pipeline.packing import pack_dataset

PILLOW_LIMIT = 1_000_000  # the test's stand-in for Pillow's 89.5M-pixel threshold


def _png(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _gif(frames: int) -> bytes:
    rng = np.random.default_rng(7)
    ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert("P") for _ in range(frames)]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=50, loop=0)
    return buf.getvalue()


def _row(rid, image):
    return {
        "id": rid,
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "ok"}],
    }


@pytest.fixture
def odd(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_LIMIT)
    root = tmp_path / "images"
    root.mkdir()
    files = {
        "small.png": _png((64, 48), 0),
        "warns.png": _png((1100, 1000), 1),  # 1.1M: over Pillow's threshold, under twice it
        "errors.png": _png((1500, 1500), 2),  # 2.25M: over twice the threshold (Pillow raises)
        "anim.gif": _gif(3),
        "still.gif": _gif(1),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    rows = [_row(f"r{i}", name) for i, name in enumerate(files)]
    rows.append(_row("multi", ["small.png", "anim.gif"]))
    data = tmp_path / "ov.json"
    data.write_text(json.dumps(rows))
    return {"root": str(root), "json": str(data), "tmp": tmp_path}


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def _problems(out, category) -> dict[str, str]:
    return {p["path"]: p["reason"] for p in _report(out)["problems"].get(category, [])}


def test_images_over_the_pixel_limit_are_rejected_by_name_without_pillows_warning(odd):
    out = odd["tmp"] / "pack"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's anonymous warning
        result = pack_dataset([odd["json"]], odd["root"], str(out), progress=False, max_pixels=PILLOW_LIMIT)
    large = _problems(out, "too_large")
    assert set(large) == {"warns.png", "errors.png"}
    assert "1100x1000 = 1,100,000 pixels" in large["warns.png"] and "--max-pixels" in large["warns.png"]
    assert "1,000,000" in large["errors.png"]
    assert "unreadable" not in _report(out)["problems"]
    packed = PackedDataset(str(out))
    assert packed.max_pixels == PILLOW_LIMIT
    assert packed.key_for_path("warns.png") is None and packed.key_for_path("small.png") is not None
    assert result.counts["too_large"] == 2
    table = packed.row_images("ov.json")
    assert table[1] == SKIPPED and table[2] == SKIPPED


def test_a_lower_limit_rejects_what_pillow_would_accept(odd):
    out = odd["tmp"] / "pack"
    pack_dataset([odd["json"]], odd["root"], str(out), progress=False, max_pixels=64 * 48)
    assert set(_problems(out, "too_large")) == {"warns.png", "errors.png"}  # gifs are 32x32, small 64x48
    pack_dataset([odd["json"]], odd["root"], str(out), progress=False, max_pixels=64 * 48 - 1)
    assert "small.png" in _problems(out, "too_large")  # a changed limit re-checks every file


def test_a_higher_limit_is_recorded_and_allowed_wherever_the_pack_is_read(odd, monkeypatch):
    out = odd["tmp"] / "pack"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pack_dataset([odd["json"]], odd["root"], str(out), progress=False, max_pixels=3_000_000)
    assert "too_large" not in _report(out)["problems"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_LIMIT)  # as in a fresh process that reads the pack
    source = PackedImageSource(str(out))
    assert Image.MAX_IMAGE_PIXELS == 3_000_000
    key = source.packed.key_for_path("errors.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert source(key).size == (1500, 1500)
    source.close()


def test_animated_images_are_packed_and_reported(odd):
    out = odd["tmp"] / "pack"
    pack_dataset([odd["json"]], odd["root"], str(out), progress=False, max_pixels=3_000_000)
    animated = _problems(out, "animated")
    assert set(animated) == {"anim.gif"}  # a one-frame GIF is not animated
    assert "3 frames" in animated["anim.gif"] and "first frame" in animated["anim.gif"]
    assert PackedDataset(str(out)).key_for_path("anim.gif") is not None


def test_multi_image_rows_say_they_are_not_supported_and_are_skipped(odd):
    out = odd["tmp"] / "pack"
    result = pack_dataset([odd["json"]], odd["root"], str(out), progress=False, max_pixels=3_000_000)
    report = _report(out)
    (multi,) = report["problems"]["multi_image"]
    assert (multi["row"], multi["id"]) == (5, "multi")
    assert "multi-image rows are not supported yet" in multi["reason"] and "list of 2 images" in multi["reason"]
    assert "path_rejected" not in report["problems"]
    assert result.counts["rows_skipped"] == 1
    packed = PackedDataset(str(out))
    assert packed.row_images("ov.json")[5] == SKIPPED
    records = records_from_packed(str(out), odd["json"])  # the trainer's join of rows to images
    assert [r.row_id for r in records] == ["r0", "r1", "r2", "r3", "r4"]
    assert sum(v["count"] for v in records.skipped.values()) == 1


def test_pack_cli_max_pixels(odd, capsys):
    out = odd["tmp"] / "cli"
    args = ["pack", "--data", odd["json"], "--image-root", odd["root"], "--out", str(out), "--no-progress"]
    assert cli_main(args + ["--max-pixels", "1000000"]) == 0
    printed = capsys.readouterr().out
    assert "too_large" in printed and "multi_image" in printed and "animated" in printed
    assert cli_main(args + ["--max-pixels", "0"]) == 2
    assert "max_pixels (--max-pixels) must be a positive integer" in capsys.readouterr().err
