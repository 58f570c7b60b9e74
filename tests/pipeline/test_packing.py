"""Packing: every oddity of real LLaVA data lands in the right report category, good images are
packed once with their bytes untouched, lookups work, output is stable and resume is exact."""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import os
import random
import subprocess
import sys

import pytest
from PIL import Image

from jobs.cli import main as cli_main
from pipeline import llava_data, packing_io
from pipeline.packed_dataset import SKIPPED, TEXT_ONLY, dataset_fingerprint, shard_name
from pipeline.packing import PackedDataset, pack_dataset


def _photo(name: str, factor: int = 4) -> Image.Image:
    with Image.open(importlib.resources.files("skimage.data") / name) as im:
        return im.convert("RGB").reduce(factor)


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85, **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _row(rid, image=None, question="Describe the image."):
    row = {"id": rid}
    if image is not None:
        row["image"] = image
        question = "<image>\n" + question
    row["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": "ok"}]
    return row


FILES = {  # relative path under the image root -> bytes builder
    "a/astronaut.jpg": lambda: _jpeg(_photo("astronaut.png")),
    "a/chelsea.jpg": lambda: _jpeg(_photo("chelsea.png", 2)),
    "b/coffee.jpg": lambda: _jpeg(_photo("coffee.png")),
    "b/astronaut_copy.jpg": lambda: FILES["a/astronaut.jpg"](),
    "b/truncated.jpg": lambda: _jpeg(_photo("rocket.jpg", 2))[:1500],
    "c/cmyk.jpg": lambda: _jpeg(_photo("motorcycle_left.png").convert("CMYK")),
    "c/gray.jpg": lambda: _jpeg(_photo("camera.png").convert("L")),
    "c/png_as.jpg": lambda: _png(_photo("motorcycle_right.png")),
    "c/empty.jpg": lambda: b"",
}

EXPECTED = {  # report category -> paths ("path_rejected" also gets the absolute path)
    "path_rejected": {"../outside.jpg", "c/link_out.jpg"},
    "missing": {"a/missing.jpg"},
    "empty": {"c/empty.jpg"},
    "unreadable": {"b/truncated.jpg"},
    "format_mismatch": {"c/png_as.jpg"},
    "color_mode": {"c/cmyk.jpg", "c/gray.jpg"},
    "duplicate_content": {"b/astronaut_copy.jpg", "c/link_in.jpg"},
}
GOOD = ["a/astronaut.jpg", "a/chelsea.jpg", "b/coffee.jpg", "c/cmyk.jpg", "c/gray.jpg", "c/png_as.jpg"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("llava")
    root = base / "images"
    for rel, make in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(make())
    (base / "outside.jpg").write_bytes(FILES["a/astronaut.jpg"]())
    os.symlink(base / "outside.jpg", root / "c" / "link_out.jpg")
    os.symlink(root / "a" / "chelsea.jpg", root / "c" / "link_in.jpg")
    absolute = str(root / "b" / "coffee.jpg")
    rows = [
        _row("r0", "a/astronaut.jpg"),
        _row("r1", "./a/astronaut.jpg"),
        _row("r2", "a/x/../chelsea.jpg"),
        _row("r3", "b/coffee.jpg"),
        _row("r4", "b/astronaut_copy.jpg"),
        _row("r5", "a/missing.jpg"),
        _row("r6", "b/truncated.jpg"),
        _row("r7", "c/cmyk.jpg"),
        _row("r8", "c/gray.jpg"),
        _row("r9", "c/png_as.jpg"),
        _row("r10", "../outside.jpg"),
        _row("r11", absolute),
        _row("r12", "c/empty.jpg"),
        _row("r13", "c/link_out.jpg"),
        _row("r14", "c/link_in.jpg"),
        _row("t0", question="Tell me a joke."),
        17,
        {"id": "bad", "conversations": "no"},
        _row("r15", "a/astronaut.jpg"),
        _row("t1", question="Another text-only question."),
    ]
    second = [_row("s0", "c/gray.jpg"), _row("s1", "a/astronaut.jpg"), _row("s2")]
    (base / "first.json").write_text(json.dumps(rows, indent=1))
    (base / "second.json").write_text(json.dumps(second))
    expected = {**EXPECTED, "path_rejected": EXPECTED["path_rejected"] | {absolute}}
    return {
        "root": str(root),
        "json": [str(base / "first.json"), str(base / "second.json")],
        "rows": rows,
        "second": second,
        "expected": expected,
    }


def _pack(ds, out, **kw):
    kw.setdefault("shard_size", 2)
    return pack_dataset(ds["json"], ds["root"], str(out), progress=False, **kw)


def _outputs(out) -> dict[str, bytes]:
    names = sorted(n for n in os.listdir(out) if n != "_checks.jsonl")
    return {n: (out / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return out, _pack(dataset, out, workers=2)


def test_report_categories(clean, dataset):
    out, result = clean
    report = json.loads((out / "report.json").read_text())
    for cat, paths in dataset["expected"].items():
        got = {p["path"] for p in report["problems"].get(cat, [])}
        assert got == paths, cat
    for entries in report["problems"].values():
        for p in entries:
            assert p["file"] in ("first.json", "second.json") and p["reason"]
            assert isinstance(p["row"], int) and p["n_rows"] >= 1
    invalid = report["problems"]["invalid_row"]
    assert [(p["row"], p["id"]) for p in invalid] == [(16, None), (17, "bad")]
    c = report["counts"]
    assert (c["rows"], c["rows_text_only"], c["unique_images"]) == (23, 3, len(GOOD))
    assert c["rows_skipped"] == 2 + 3 + 3  # invalid rows, rejected paths, missing/empty/truncated
    astro = next(p for p in report["problems"]["duplicate_content"] if "astronaut" in p["path"])
    assert (astro["row"], astro["id"]) == (4, "r4")


def test_good_images_packed_once_untouched(clean, dataset):
    out, result = clean
    packed = PackedDataset(str(out))
    seen = {}
    for i in range(packed.num_shards):
        assert packed.keys_in_shard(i) == [k for k, _, _ in packed.iter_shard(i)]
        for key, data, meta in packed.iter_shard(i):
            assert key not in seen
            seen[key] = meta
            sha = hashlib.sha256(data).hexdigest()
            assert sha == meta["sha256"] and key == sha[:16]
            for rel in meta["paths"]:
                with open(os.path.join(dataset["root"], rel), "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == sha
    assert sorted(p for m in seen.values() for p in m["paths"]) == sorted(
        GOOD + ["b/astronaut_copy.jpg", "c/link_in.jpg"]
    )
    png = seen[packed.key_for_path("c/png_as.jpg")]
    assert (png["format"], packed.locate(png["key"])[1].endswith(".png")) == ("PNG", True)
    cmyk = seen[packed.key_for_path("c/cmyk.jpg")]
    assert cmyk["mode"] == "CMYK" and cmyk["width"] > 0 and cmyk["height"] > 0
    assert packed.fingerprint == dataset_fingerprint(sorted(seen), 2) == result.fingerprint


def test_index_lookups(clean):
    out, _ = clean
    packed = PackedDataset(str(out))
    astro = packed.key_for_path("a/astronaut.jpg")
    assert packed.key_for_path("./a/astronaut.jpg") == astro
    assert packed.key_for_path("b/astronaut_copy.jpg") == astro
    assert packed.key_for_path("a/x/../chelsea.jpg") == packed.key_for_path("c/link_in.jpg")
    for bad in ("a/missing.jpg", "b/truncated.jpg", "../outside.jpg", "c/empty.jpg"):
        assert packed.key_for_path(bad) is None
    assert packed.rows_for_key(astro) == {"first.json": [0, 1, 4, 18], "second.json": [1]}
    assert packed.text_only_rows("first.json") == [15, 19]
    assert packed.text_only_rows("second.json") == [2]
    rows = packed.row_images("first.json")
    assert rows[5] == rows[16] == SKIPPED and rows[15] == TEXT_ONLY
    assert packed.key_for_row("second.json", 0) == packed.key_for_path("c/gray.jpg")
    shard, member = packed.locate(astro)
    assert astro in packed.keys_in_shard(shard) and member == astro + ".jpg"
    assert os.path.basename(packed.shard_path(shard)) == shard_name(shard)
    with pytest.raises(ValueError, match="not in the pack"):
        packed.locate("0" * 16)
    with pytest.raises(ValueError, match="no JSON file named"):
        packed.row_images("nope.json")


def test_webdataset_reads_the_shards(clean):
    import webdataset as wds

    out, _ = clean
    packed = PackedDataset(str(out))
    for i in range(packed.num_shards):
        samples = list(wds.WebDataset(packed.shard_path(i), shardshuffle=False))
        mine = list(packed.iter_shard(i))
        assert [s["__key__"] for s in samples] == [k for k, _, _ in mine]
        for s, (_, data, _) in zip(samples, mine):
            assert (s.get("jpg") or s.get("png")) == data


def test_stable_across_runs_and_row_order(clean, dataset, tmp_path):
    out, result = clean
    shuffled = tmp_path / "in"
    shuffled.mkdir()
    rows = list(dataset["rows"])
    random.Random(0).shuffle(rows)
    (shuffled / "first.json").write_text(json.dumps(rows))
    (shuffled / "second.json").write_text(json.dumps(dataset["second"]))
    again = pack_dataset(
        [str(shuffled / "first.json"), str(shuffled / "second.json")],
        dataset["root"],
        str(tmp_path / "out"),
        shard_size=2,
        workers=1,
        progress=False,
    )
    assert again.fingerprint == result.fingerprint
    for i in range(result.num_shards):
        assert (tmp_path / "out" / shard_name(i)).read_bytes() == (out / shard_name(i)).read_bytes()


def test_resume_rewrites_only_damaged_shards(clean, dataset, tmp_path):
    out, result = clean
    work = tmp_path / "out"
    first = _pack(dataset, work, workers=1)
    assert first.shards_written == [0, 1, 2]
    (work / shard_name(1)).unlink()
    (work / (shard_name(0) + ".tmp")).write_bytes(b"half a shard")
    with open(work / shard_name(2), "r+b") as f:
        f.truncate(1024)
    again = _pack(dataset, work, workers=1)
    assert (sorted(again.shards_written), again.shards_reused) == ([1, 2], [0])
    assert not (work / (shard_name(0) + ".tmp")).exists()
    assert _outputs(work) == _outputs(out)


def test_unrecorded_shard_is_not_complete(clean, dataset, tmp_path, monkeypatch):
    out, _ = clean
    work = tmp_path / "out"
    real = packing_io._write_tar

    def crash_on_1(out_dir, i, *args):
        if i == 1:
            raise OSError("disk full (simulated)")
        return real(out_dir, i, *args)

    monkeypatch.setattr(packing_io, "_write_tar", crash_on_1)
    with pytest.raises(OSError, match="simulated"):
        _pack(dataset, work, workers=1)
    assert not (work / "index.json").exists()
    with pytest.raises(ValueError, match="not a finished pack"):
        PackedDataset(str(work))
    monkeypatch.setattr(packing_io, "_write_tar", real)
    progress = json.loads((work / "_progress.json").read_text())
    (work / shard_name(2)).write_bytes((out / shard_name(2)).read_bytes())  # tar, no record
    assert sorted(progress["shards"]) == [shard_name(0)]
    again = _pack(dataset, work, workers=1)
    assert (sorted(again.shards_written), again.shards_reused) == ([1, 2], [0])
    assert _outputs(work) == _outputs(out)


def test_rerun_on_smaller_input_drops_stale_shards(clean, dataset, tmp_path):
    work = tmp_path / "out"
    _pack(dataset, work, workers=1)
    small = pack_dataset(dataset["json"][1:], dataset["root"], str(work), shard_size=2, progress=False)
    assert small.num_images == 2 and sorted(os.listdir(work)).count(shard_name(2)) == 0
    packed = PackedDataset(str(work))
    assert packed.files == ["second.json"] and packed.key_for_path("b/coffee.jpg") is None
    assert [len(list(packed.iter_shard(i))) for i in range(packed.num_shards)] == [2]


def test_check_cache_skips_unchanged_files(dataset, tmp_path, monkeypatch):
    from pipeline import image_checks

    root = tmp_path / "img"
    root.mkdir()
    (root / "a.jpg").write_bytes(FILES["a/chelsea.jpg"]())
    (tmp_path / "d.json").write_text(json.dumps([_row("0", "a.jpg")]))
    args = ([str(tmp_path / "d.json")], str(root), str(tmp_path / "out"))
    first = pack_dataset(*args, progress=False)
    monkeypatch.setattr(image_checks, "_decode", lambda *a: pytest.fail("decoded again"))
    assert pack_dataset(*args, progress=False).fingerprint == first.fingerprint
    (root / "a.jpg").write_bytes(FILES["a/astronaut.jpg"]())  # changed: must be checked again
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        pack_dataset(*args, progress=False)


def test_cli(dataset, tmp_path, capsys):
    args = ["pack", "--image-root", dataset["root"], "--out", str(tmp_path / "o"), "--no-progress"]
    for j in dataset["json"]:
        args += ["--data", j]
    assert cli_main(args + ["--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "unique images in 2 shard(s)" in printed and "unreadable" in printed
    assert cli_main(args + ["--shard-size", "0"]) == 2
    assert "shard_size must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw, norm", [("a/b.jpg", "a/b.jpg"), ("./a//b.jpg", "a/b.jpg"), ("a/./c/../b.jpg", "a/b.jpg")]
)
def test_normalize_ok(raw, norm):
    assert llava_data.normalize_image_path(raw) == norm


@pytest.mark.parametrize("raw", ["../a.jpg", "a/../../b.jpg", "/abs/a.jpg", "", ".", "a\\b.jpg", 7])
def test_normalize_rejects(raw):
    with pytest.raises(ValueError):
        llava_data.normalize_image_path(raw)


def test_streaming_reader_matches_json_load(dataset, monkeypatch):
    monkeypatch.setattr(llava_data, "CHUNK_BYTES", 5)  # every row straddles chunk boundaries
    path = dataset["json"][0]
    assert list(llava_data.iter_json_list(path)) == json.loads(open(path).read())
    rows = llava_data.read_llava_json(path)
    assert rows.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert rows.images[1] == "a/astronaut.jpg" and rows.images[1] is rows.images[0]


@pytest.mark.parametrize(
    "text, msg",
    [
        ("{}", "must be a JSON list"),
        ("[1, 2", "end of file"),
        ("[1] 2", "after the top-level list"),
        ("[{]", "at the first row: invalid JSON"),
        ("[1, 2,]", "after row 1: expected a row"),
        ("[1 2]", "expected a comma"),
        ("[,1]", "a row"),
    ],
)
def test_malformed_file_is_a_clear_error(tmp_path, text, msg):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=msg):
        llava_data.read_llava_json(str(tmp_path / "bad.json"))


def test_packing_does_not_import_torch():
    code = "import sys, pipeline.packing, pipeline.sample_data, jobs.pack; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_pack_of_nothing_exits_non_zero_and_extraction_refuses_it_before_loading_teachers(
    dataset, tmp_path, capsys, monkeypatch
):
    """Every image missing: pack used to exit 0, and extraction then died after loading the
    teachers ("num_shards must be > 0")."""
    from jobs.extract import main as extract_main

    empty_root = tmp_path / "no-images-here"
    empty_root.mkdir()
    out = tmp_path / "empty-pack"
    args = ["pack", "--image-root", str(empty_root), "--out", str(out), "--no-progress"]
    for j in dataset["json"]:
        args += ["--data", j]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "nothing was packed" in err and "report.json" in err

    import pipeline.extract_worker as worker

    def never(*a, **k):
        raise AssertionError("a teacher was loaded for an empty pack")

    monkeypatch.setattr(worker.ShardExtractor, "__init__", never)
    code = extract_main(["--config", "tiny", "--packed", str(out), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "holds no images" in err[-1] and "nothing to extract" in err[-1]
    code = extract_main(["--config", "tiny", "--packed", str(tmp_path / "nope"), "--out", str(tmp_path / "c2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "not a finished pack" in err[-1]
