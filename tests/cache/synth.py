"""Synthetic caches for the cache tests: a small manifest factory and deterministic shard data.

A plain module (not conftest) so that subprocess children in the kill/concurrency tests can import
it too (``from tests.cache.synth import ...``, run with the repository root as the working dir).
Sizes are tiny on purpose: three teachers (a CLS teacher plus two others with different grids,
channel counts and codecs), shards of 4 rows, the last data shard one row short.
"""

from __future__ import annotations

import numpy as np

from cache import NULL_KEY, CacheManifest, CacheWriter, PreprocessSpec, TeacherEntry

CLS_GRID = (4, 4)


def make_teacher(name: str, grid=(4, 4), channels=64, codec="bf16", resolution=56, **kw) -> TeacherEntry:
    pre = kw.pop("preprocess", None) or PreprocessSpec(resolution=resolution)
    return TeacherEntry(
        name=name,
        family=kw.pop("family", name),
        source=kw.pop("source", f"test/{name}"),
        weights_fingerprint=kw.pop("weights_fingerprint", f"sha256:{name}"),
        layer=kw.pop("layer", "blocks[-2]"),
        tokens=grid[0] * grid[1],
        grid=grid,
        channels=channels,
        compute_dtype=kw.pop("compute_dtype", "bfloat16"),
        preprocess=pre,
        codec=codec,
        **kw,
    )


def make_manifest(
    num_shards: int = 3, shard_size: int = 4, codecs: dict | None = None, cls: bool = True, **overrides
) -> CacheManifest:
    """clip (CLS teacher, 4x4 grid, 64 ch), eva (8x8, 32 ch) and convnext (2x2, 64 ch)."""
    codecs = {"clip": "bf16", "eva": "int8", "convnext": "int4", **(codecs or {})}
    teachers = [
        make_teacher("clip", CLS_GRID, 64, codecs["clip"], 56, has_cls=cls),
        make_teacher("eva", (8, 8), 32, codecs["eva"], 112),
        make_teacher("convnext", (2, 2), 64, codecs["convnext"], 112, resample="area", native_grid=(3, 3)),
    ]
    kw = dict(
        teachers=teachers,
        num_shards=num_shards,
        shard_size=shard_size,
        dataset_fingerprint="sha256:toy-dataset",
        dataset_name="toy",
        cls_teacher="clip" if cls else None,
    )
    kw.update(overrides)
    return CacheManifest(**kw)


def single_teacher_manifest(codec: str, tokens_grid=(8, 8), channels: int = 256, shard_size: int = 4) -> CacheManifest:
    return CacheManifest(
        teachers=[make_teacher("t", tokens_grid, channels, codec)],
        num_shards=1,
        shard_size=shard_size,
        dataset_fingerprint="sha256:single",
    )


def shard_len(manifest: CacheManifest, shard: int) -> int:
    """Rows written into ``shard``: full shards except the last data shard (one short)."""
    if shard == manifest.num_shards:
        return 1
    if shard == manifest.num_shards - 1 and manifest.shard_size > 1:
        return manifest.shard_size - 1
    return manifest.shard_size


def shard_keys(manifest: CacheManifest, shard: int) -> list[str]:
    if shard == manifest.num_shards:
        return [NULL_KEY]
    return [f"img-{shard:03d}-{i:02d}" for i in range(shard_len(manifest, shard))]


def shard_data(manifest: CacheManifest, shard: int, seed: int = 0) -> dict:
    """Deterministic write_shard() arguments for ``shard`` (same seed -> same arrays)."""
    rng = np.random.default_rng([seed, shard])
    keys = shard_keys(manifest, shard)
    n = len(keys)
    feats = {
        t.name: (rng.standard_normal((n, t.tokens, t.channels)) * (1 + i)).astype(np.float32)
        for i, t in enumerate(manifest.teachers)
    }
    out = {"keys": keys, "features": feats}
    if manifest.cls_teacher is not None:
        cls = manifest.teacher(manifest.cls_teacher)
        attn = rng.random((n, cls.tokens)) ** 4
        out["cls_state"] = rng.standard_normal((n, cls.channels)).astype(np.float32)
        out["cls_attn"] = (attn / attn.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def default_failed(manifest: CacheManifest, shard: int) -> dict[str, str]:
    """Shard 1 has one failed image (its second row)."""
    if shard == 1 and shard < manifest.num_shards and shard_len(manifest, shard) > 1:
        return {shard_keys(manifest, shard)[1]: "image decode error: truncated JPEG"}
    return {}


def write_shard(writer: CacheWriter, shard: int, seed: int = 0, with_failed: bool = True, replace: bool = False):
    data = shard_data(writer.manifest, shard, seed)
    failed = default_failed(writer.manifest, shard) if with_failed else None
    return writer.write_shard(
        shard,
        data["keys"],
        data["features"],
        data.get("cls_state"),
        data.get("cls_attn"),
        failed=failed,
        replace=replace,
    )


def build_cache(
    location,
    manifest: CacheManifest | None = None,
    shards=None,
    null: bool = True,
    seed: int = 0,
    with_failed: bool = True,
) -> CacheManifest:
    """Create a cache at ``location`` and write ``shards`` (default all) plus the no-image row."""
    manifest = manifest or make_manifest()
    writer = CacheWriter.create(location, manifest)
    for shard in range(manifest.num_shards) if shards is None else shards:
        write_shard(writer, shard, seed, with_failed)
    if null:
        write_shard(writer, manifest.num_shards, seed)
    return manifest


def expected_decoded(manifest: CacheManifest, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """key -> teacher -> what the cache should return (input through the teacher's codec)."""
    from cache import get_codec

    out: dict[str, dict[str, np.ndarray]] = {}
    for shard in range(manifest.num_shards + 1):
        data = shard_data(manifest, shard, seed)
        for t in manifest.teachers:
            codec = get_codec(t.codec)
            dec = codec.decode(codec.encode(data["features"][t.name]))
            for key, row in zip(data["keys"], dec):
                out.setdefault(key, {})[t.name] = row
    return out


def flip_payload_bit(file, shard_size: int, chunk: int = 1, index: bool = False) -> None:
    """Flip one bit of a zarr shard file: mid-payload of inner chunk ``chunk``, or in the index.

    The shard index sits at the end: an (offset, nbytes) pair of little-endian uint64 per inner
    chunk, then a CRC32C; flipping by the index keeps the corruption inside real data.
    """
    data = bytearray(file.read_bytes())
    table = np.frombuffer(bytes(data[-(16 * shard_size + 4) : -4]), "<u8").reshape(-1, 2)
    offset, nbytes = table[chunk]
    pos = len(data) - 10 if index else int(offset + nbytes // 2)
    data[pos] ^= 0x10
    file.write_bytes(bytes(data))


def downgrade_to_format_1(root: str) -> None:
    """Rewrite a built cache's manifest as the format 1 code wrote it (no ``null_input``, no
    ``preprocess.alpha``, ``format_version`` 1): what an old cache on disk looks like."""
    import json
    import os

    path = os.path.join(root, "zarr.json")
    with open(path) as f:
        meta = json.load(f)
    m = meta["attributes"]["movekd"]
    m["format_version"] = 1
    m.pop("null_input")
    for t in m["teachers"]:
        t["preprocess"].pop("alpha")
    with open(path, "w") as f:
        json.dump(meta, f)


def release_like_manifest(num_shards: int = 559, shard_size: int = 1000) -> CacheManifest:
    """A manifest with the names, sources, layers, grids and codecs of the released teacher set
    (jobs/configs movekd_v1_1_finetune, plus pix2struct and the longest codec names): for checking
    that text output fits a terminal. Creating it writes array metadata only."""
    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

    def pre(resolution, **kw):
        return PreprocessSpec(resolution=resolution, aspect="pad", **kw)

    teachers = [
        make_teacher(
            "clip",
            (24, 24),
            1024,
            "int8",
            family="clip",
            source="openai/clip-vit-large-patch14-336",
            layer="hidden_states[-2][:, 1:]",
            preprocess=pre(336),
            has_cls=True,
        ),
        make_teacher(
            "sam",
            (64, 64),
            256,
            "int8_channel",
            family="sam",
            source="facebook/sam-vit-large",
            layer="vision_encoder.neck output (channels-last, row-major)",
            preprocess=pre(
                1024, resize="longest_edge", crop="none", pad="bottom_right", interpolation="bilinear", **imagenet
            ),
        ),
        make_teacher(
            "eva",
            (64, 64),
            1024,
            "int4_g64",
            family="eva_vitdet",
            source="/data/weights/eva02_L_coco_det_sys_o365.pth",
            layer="last block output [B, H, W, C] (no final norm, no CLS token), tokens row-major",
            preprocess=pre(1024, **imagenet),
        ),
        make_teacher(
            "convnext",
            (32, 32),
            3072,
            "ecsq",
            family="convnext",
            source="timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k",
            layer="forward_intermediates: last block/stage output, no norm, prefix tokens dropped",
            preprocess=pre(1024),
        ),
        make_teacher(
            "pix2struct",
            (32, 32),
            1536,
            "bf16",
            family="pix2struct",
            source="google/pix2struct-large",
            layer="encoder last_hidden_state (fixed (48, 48) patch grid)",
            resample="area",
            native_grid=(48, 48),
            preprocess=pre(768, interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        ),
    ]
    return CacheManifest(
        teachers=teachers,
        num_shards=num_shards,
        shard_size=shard_size,
        dataset_fingerprint="9f2c4e1b7a3d5f6e8c0b2a4d6e8f0a1c3e5b7d9f1a3c5e7b9d0f2a4c6e8b0d2f",
        dataset_name="LLaVA-665K",
        cls_teacher="clip",
    )
