"""cache/FORMAT.md stays true: its plain-zarr example (no movekd imports) reads a cache of every
codec and agrees with the reader, and the fields it documents are the fields the code writes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cache import CacheManifest, PreprocessSpec, TeacherEntry, list_codecs, open_cache
from cache.marker import ShardCommit
from tests.cache import synth

FORMAT_MD = Path(__file__).resolve().parents[2] / "cache" / "FORMAT.md"


def _plain_zarr_example() -> str:
    text = FORMAT_MD.read_text()
    match = re.search(r"<!-- example: plain-zarr -->\s*```python\n(.*?)```", text, re.S)
    assert match, "FORMAT.md lost its plain-zarr example"
    return match.group(1)


@pytest.mark.parametrize(
    "codecs",
    [
        {"clip": "bf16", "eva": "int8", "convnext": "int4"},
        {"clip": "fp16", "eva": "int8_channel", "convnext": "int4_g64"},
    ],
)
def test_plain_zarr_example_matches_the_reader(tmp_path, codecs):
    code = _plain_zarr_example()
    assert "import cache" not in code and "from cache" not in code
    manifest = synth.make_manifest(codecs=codecs)
    synth.build_cache(tmp_path / "c", manifest)
    scope: dict = {}
    exec(compile(code.replace('"/path/to/cache"', repr(str(tmp_path / "c"))), "FORMAT.md", "exec"), scope)
    batch = open_cache(tmp_path / "c").read(scope["m"]["keys"], allow_invalid=True)
    for name, x in scope["features"].items():
        np.testing.assert_array_equal(x, batch.features[name])
    np.testing.assert_array_equal(scope["valid"], batch.valid)
    assert set(codecs.values()) <= set(list_codecs())


def test_documented_fields_are_the_written_fields(manifest):
    text = FORMAT_MD.read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    written = set(manifest.to_dict()) | {f.name for f in dataclasses.fields(TeacherEntry)}
    written |= {f.name for f in dataclasses.fields(PreprocessSpec)}
    written |= set(ShardCommit(0, ["k"]).to_dict())
    assert written - documented == set(), "fields written but not documented in FORMAT.md"
    assert {f.name for f in dataclasses.fields(CacheManifest)} <= written
    for codec in list_codecs():
        assert f"`{codec}`" in text, codec
    assert json.loads(json.dumps(manifest.to_dict()))["format_version"] == 2 and "format version 2" in text
