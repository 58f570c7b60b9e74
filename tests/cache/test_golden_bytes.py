"""Caches are byte-identical across refactors: a fixed input always gives the same files.

The digests below were recorded with the code of 2026-12-01 (before the configuration/extraction
refactor of issue 8) and must not change unless the on-disk format deliberately does (then bump
``FORMAT_VERSION`` and record new digests). Format 2 (issue 9) changed only the manifest (it adds
``null_input`` and ``preprocess.alpha``): so a format 2 cache, its manifest rewritten back to the
format 1 form, must still give the format 1 digests (``GOLDEN``), which proves every array,
marker and checksum is unchanged; ``GOLDEN_V2`` pins the format 2 cache as written. Two digests
per cache:

- ``files``: every file's raw bytes (zarr shard files as compressed on disk), with JSON files
  (``zarr.json``, commit markers) compared after dropping provenance fields (creation time,
  package version, writer host/pid), which are not part of a cache's contents.
- ``values``: the same JSON plus every array's stored values as zarr decodes them. It does not
  depend on the compressor library's byte output, so when only ``files`` differs the cause is a
  new zstd/blosc build (``numcodecs``), not our code.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import zarr

from cache import list_codecs
from tests.cache.synth import build_cache, downgrade_to_format_1, make_manifest

PROVENANCE = {"created", "package_version", "written_at", "writer"}
# Commit markers' ``files`` (shard file sizes) are derived from the files hashed here: recorded since
# the digests were taken, dropped from the comparison like provenance (their bytes are compared).
DERIVED = {"files"}
FIXED = {"created": "2026-12-01T00:00:00+00:00", "package_version": "0.1.0"}

# codec -> (files digest, values digest), recorded before the refactor (see module docstring).
GOLDEN = {
    "bf16": (
        "0fd6bce38536ea3538fefff6fda8ac818d6ca68f7d53f9c08b55e96949927482",
        "070e314afe379974667778589a8c28a3eb6a45f3b0a00ecec153a2105295ff95",
    ),
    "ecsq": (
        "0757d8c066d8d3bb8e4a236be8468acf80f0f934ba7a9a9666d7423f3ee33b9b",
        "c85e088c7b6b5ee66878c38a918da9fa05a72b66ffad30f704ed259c75f835d2",
    ),
    "fp16": (
        "d11c00e728f39fe97b8c1608aae57eedad8b019e4135362d7959e288a51c3189",
        "ee63765f4e6590b8730aa79cbbf4c287d61c278158f5611013703eb1813fb2ae",
    ),
    "int4": (
        "8704f3d6838c79dffbeb2fd88a7a0d728db62a2640534a24b780e15349752163",
        "ebd1ddc34350fcdd047121e2a9b7791525034eee798aa0f363b08ade7d3f9e37",
    ),
    "int4_g64": (
        "2f9fe5810ff8c928659281382e0817be3307135fede9c51d8d4bc4f26ad78da5",
        "59dd1460a600a29e55d4bfba4d8bbd94831bd63bd8981a490b459d428852d541",
    ),
    "int8": (
        "15f1996f50175c35b22036e0eb47a223d662340864d1bae908608b2cede57109",
        "9af4f5832ac44afca321d6bf91d3bcb653b9b203f0e4c81e1726dd6356024991",
    ),
    "int8_channel": (
        "cbcb5e3bcb83b4863c0cb906739854cb98af64eab11dca7979daac0016823028",
        "6db521b383a1b5bf83b16ee501a55d8637e3e5779108ffd7f346f3b867c4566d",
    ),
}


# codec -> (files, values) of the same caches as written by format 2 (recorded 2026-12-02).
GOLDEN_V2 = {
    "bf16": (
        "5c1e8913a1ba7b3ae23eaa5775155cca4132e877f233931fbcb2620c335029e0",
        "2f77167e6918f889b6017aacf6a3f8186f0e961720f6ed633a53338810548433",
    ),
    "ecsq": (
        "b1a6f7962663ab08861c8a8e058cb98782a6c12eaddfad5efd9f73ec0ffbe584",
        "10bbe1c43c1b0508a3ed2ac639a6db8e304235f23c3a2104fbd3793c8f46ad98",
    ),
    "fp16": (
        "0f9da336f374aefa17713b6dd34c1f6e1923db26c43e907a2c0ec5212b125d96",
        "65abb7983597deda44d45c554d6eebc1ae699f7beff8829de577b331573edc5f",
    ),
    "int4": (
        "b8eb7fdde4feabe3129a7e554444bf6012135adf3ece8f3e5603ff25d0f7e169",
        "ee1c8c0fee8d4b7b0291b33202b6a935c13fdba9e8aed6422ae6547df12b77c4",
    ),
    "int4_g64": (
        "31663624183c15a68c2ab06afe7d5387d9b473b8c39197c7fb3a4fd23afe4436",
        "325030d21f548457151ccfe14e9b89b408560a7fd36825ccc2f4c14ba2b239d7",
    ),
    "int8": (
        "d853d8675fd5ae0ba6731142983f49930a56912cb59811ecd69c5bf5b61559c3",
        "82578a2af79803641c446f11d54ffdda9d518a69f8a343d21fc223c2f35d0a9c",
    ),
    "int8_channel": (
        "25215414e6a26130adeb34aeb6cfb87a1dbd87041c116be61e236af697c55abe",
        "b3f997afe119d1c848fff71fdc544d0c74f721e17c1b644e51b9c0bd88c8de08",
    ),
}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in PROVENANCE | DERIVED}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def cache_digests(root: str) -> tuple[str, str]:
    files, values = hashlib.sha256(), hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            data = open(path, "rb").read()
            if name.endswith(".json"):
                data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
                values.update(rel.encode() + b"\0" + data)
            files.update(rel.encode() + b"\0" + data)

    def walk(group, prefix=""):
        for name, arr in sorted(group.arrays(), key=lambda x: x[0]):
            v = np.ascontiguousarray(arr[...])
            values.update(f"{prefix}{name}|{v.dtype.str}|{v.shape}".encode() + v.tobytes())
        for name, sub in sorted(group.groups(), key=lambda x: x[0]):
            walk(sub, f"{prefix}{name}/")

    walk(zarr.open_group(root, mode="r"))
    return files.hexdigest(), values.hexdigest()


@pytest.mark.filterwarnings("ignore:Object at _commits:UserWarning")
@pytest.mark.parametrize("codec", list_codecs())
def test_cache_bytes_are_unchanged(tmp_path, codec):
    manifest = make_manifest(codecs={"convnext": codec}, **FIXED)
    root = str(tmp_path / "cache")
    build_cache(root, manifest)
    assert cache_digests(root) == GOLDEN_V2[codec], f"{codec}: the format 2 cache changed"
    downgrade_to_format_1(root)
    files, values = cache_digests(root)
    want_files, want_values = GOLDEN[codec]
    assert values == want_values, f"{codec}: the stored contents changed"
    assert files == want_files, (
        f"{codec}: the stored values are the same but the file bytes differ: "
        "a different zstd/blosc build (numcodecs) compresses differently"
    )
