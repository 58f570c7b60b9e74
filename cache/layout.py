"""The cache's zarr layout: which arrays exist, their shapes, chunking, sharding and codecs.

    <root>/zarr.json                      group; attributes["movekd"] = the manifest
    <root>/teachers/<teacher>/<component> [rows, *component shape]  (codec components)
    <root>/aux/cls_state                  [rows, C]  float32   (CLS teacher's layer -2 [CLS] state)
    <root>/aux/cls_attn                   [rows, N]  float32   (its head-mean [CLS] attention row)
    <root>/_commits/shard-XXXXX.json      commit markers (see writer.py)
    <root>/stats.json                     optional per-teacher channel statistics

Every array has one inner chunk per image (row) and one zarr shard per cache shard of
``shard_size`` rows, so a cache shard is written as whole zarr shards (one file per array) and a
single image is read by one ranged read. The reserved "no image" row is the last row, alone in
the final, partial zarr shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from cache.codecs import Component, get_codec
from cache.manifest import CacheManifest

TEACHERS = "teachers"
AUX = "aux"
COMMITS = "_commits"
STATS_FILE = "stats.json"
CLS_STATE = f"{AUX}/cls_state"
CLS_ATTN = f"{AUX}/cls_attn"
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class ArraySpec:
    path: str
    per_row: tuple[int, ...]
    dtype: str
    compressor: str
    teacher: str | None
    component: str | None


MARKER_NAME = re.compile(r"shard-(\d{5})\.json")  # a commit marker's file name in _commits/


def marker_name(shard: int) -> str:
    return f"{COMMITS}/shard-{shard:05d}.json"


def array_specs(manifest: CacheManifest) -> list[ArraySpec]:
    """Every array of a cache with this manifest, teachers first, in a stable order."""
    specs = []
    for t in manifest.teachers:
        for comp in get_codec(t.codec).components(t.tokens, t.channels):
            specs.append(_spec(f"{TEACHERS}/{t.name}/{comp.name}", comp, t.name))
    if manifest.cls_teacher is not None:
        cls = manifest.teacher(manifest.cls_teacher)
        specs.append(ArraySpec(CLS_STATE, (cls.channels,), "float32", "zstd", None, None))
        specs.append(ArraySpec(CLS_ATTN, (cls.tokens,), "float32", "zstd", None, None))
    return specs


def _spec(path: str, comp: Component, teacher: str) -> ArraySpec:
    return ArraySpec(path, tuple(comp.shape), comp.dtype, comp.compressor, teacher, comp.name)


def _compressor(spec: ArraySpec):
    if spec.compressor == "blosc-shuffle":
        return BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle", typesize=np.dtype(spec.dtype).itemsize)
    if spec.compressor == "zstd":
        return ZstdCodec(level=ZSTD_LEVEL)
    if spec.compressor == "zstd-1":  # low-entropy int8 levels (ecsq): level 3's short matches cost bits
        return ZstdCodec(level=1)
    raise ValueError(f"unknown compressor {spec.compressor!r} for {spec.path}")


def create_arrays(group: zarr.Group, manifest: CacheManifest) -> None:
    rows = manifest.num_rows
    for spec in array_specs(manifest):
        attrs = {"movekd_teacher": spec.teacher, "movekd_component": spec.component}
        if spec.teacher is not None:
            teacher = manifest.teacher(spec.teacher)
            attrs["movekd_codec"] = teacher.codec
            if teacher.codec == "bf16" and spec.component == "values":
                attrs["movekd_dtype"] = "bfloat16"  # zarr has no bfloat16: these are its bits
        group.create_array(
            spec.path,
            shape=(rows, *spec.per_row),
            chunks=(1, *spec.per_row),
            shards=(manifest.shard_size, *spec.per_row),
            dtype=spec.dtype,
            compressors=_compressor(spec),
            fill_value=0,
            attributes=attrs,
        )


def shard_file_key(spec: ArraySpec, shard: int) -> str:
    """The store key of ``spec``'s zarr shard for cache shard ``shard`` (default v3 chunk keys)."""
    return array_file_key(spec.path, len(spec.per_row), shard)


def array_file_key(path: str, per_row_ndim: int, shard: int) -> str:
    """``shard_file_key`` from an array path and the number of its per-row dimensions."""
    return f"{path}/c/{shard}" + "/0" * per_row_ndim
