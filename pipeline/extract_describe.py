"""``movekd extract --dry-run``: an extraction's plan, shapes and disk budget, before any model loads.

From teacher metadata alone (``pipeline.teachers.describe_teacher``: no weights are read), the
packed dataset's index (if ``packed`` is set) and the cache's markers (if ``out`` exists):

- per teacher: source, preprocessing, tapped layer, stored token grid x channels, codec and the
  bytes one image occupies in the codec's arrays, next to raw bf16;
- the images and shards of the pack, which shards the cache already holds, and the disk budget
  of the whole cache and of what is still to do.

Decisions:
- The budget is the codec's stored bytes *before* zstd (an upper bound: zstd saves a further
  ~3-10 % on int8 values and more on the no-image row; BENCHMARKS.md has measured ratios).
- An existing cache is compared with the plan on what metadata can know (teacher names, family,
  source, grid, channels, codec, preprocessing), not on weight fingerprints: the real run still
  checks the whole manifest before writing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cache.layout import COMMITS
from cache.manifest import CacheManifest
from cache.store import Location
from cache.text import human_bytes, preprocess_summary, table
from pipeline.extract_config import ExtractConfig
from pipeline.teachers import TeacherInfo, describe_teacher


@dataclass(frozen=True)
class ExtractionDescription:
    cfg: ExtractConfig
    teachers: tuple[TeacherInfo, ...]
    images: int | None  # unique images in the pack (None: packed unset or not packed yet)
    num_shards: int | None
    committed: tuple[int, ...]  # data shards already committed in the cache
    images_committed: int
    cache_state: str  # one line a person reads

    def bytes_per_image(self) -> int:
        """Stored bytes of one image: every teacher's codec arrays plus the CLS teacher's float32
        [CLS] state and attention row."""
        total = sum(t.stored_bytes_per_image(self.cfg.codec_for(t.name)) for t in self.teachers)
        cls = next((t for t in self.teachers if t.name == self.cfg.cls_teacher), None)
        return total + (4 * (cls.channels + cls.tokens) if cls is not None else 0)


def describe_extraction(cfg: ExtractConfig) -> ExtractionDescription:
    """Describe ``cfg`` without loading a model (``ValueError`` names what cannot be described)."""
    infos = tuple(describe_teacher(spec) for spec in cfg.teachers)
    images = shards = None
    counts: dict[int, int] = {}
    if cfg.packed and os.path.isdir(cfg.packed):
        from pipeline.packed_dataset import PackedDataset

        packed = PackedDataset(cfg.packed)
        shards = packed.num_shards
        counts = {s: len(packed.keys_in_shard(s)) for s in range(shards)}
        images = sum(counts.values())
    committed, state = _cache_state(cfg, infos)
    done_images = sum(counts.get(s, 0) for s in committed)
    return ExtractionDescription(cfg, infos, images, shards, committed, done_images, state)


def _cache_state(cfg: ExtractConfig, infos: tuple[TeacherInfo, ...]) -> tuple[tuple[int, ...], str]:
    if not cfg.out:
        return (), "out is not set (set it with --out or --set out=PATH)"
    loc = Location(cfg.out)
    if not loc.exists("zarr.json"):
        return (), f"{loc.url}: new cache (nothing there yet)"
    from cache.reader import load_manifest

    manifest, _ = load_manifest(loc)
    names = [n for n in loc.list(COMMITS) if n.startswith("shard-") and n.endswith(".json")]
    committed = tuple(sorted(s for s in (int(n[6:11]) for n in names) if s < manifest.num_shards))
    diffs = _differences(manifest, cfg, infos)
    if diffs:
        return committed, f"{loc.url}: EXISTS WITH A DIFFERENT CONFIGURATION ({'; '.join(diffs[:6])}): a run is refused"
    return (
        committed,
        f"{loc.url}: exists, {len(committed)} of {manifest.num_shards} data shards committed; a run resumes",
    )


def _differences(manifest: CacheManifest, cfg: ExtractConfig, infos: tuple[TeacherInfo, ...]) -> list[str]:
    if [t.name for t in manifest.teachers] != [i.name for i in infos]:
        return [f"teachers {list(manifest.teacher_names)} != {[i.name for i in infos]}"]
    out = []
    for entry, info in zip(manifest.teachers, infos):
        want = (info.family, info.source, info.grid, info.channels, cfg.codec_for(info.name), info.preprocess)
        have = (entry.family, entry.source, entry.grid, entry.channels, entry.codec, entry.preprocess)
        for field, a, b in zip(("family", "source", "grid", "channels", "codec", "preprocess"), have, want):
            if a != b:
                out.append(f"{info.name}.{field}: cache={a!r} plan={b!r}")
    return out


def format_description(d: ExtractionDescription) -> str:
    cfg = d.cfg
    rows = []
    for t in d.teachers:
        codec = cfg.codec_for(t.name)
        grid = "x".join(map(str, t.grid)) + (
            f" (from {'x'.join(map(str, t.native_grid))})" if t.grid != t.native_grid else ""
        )
        rows.append([
            t.name + ("*" if t.name == cfg.cls_teacher else ""), t.family, t.source or "(not set)", t.layer,
            preprocess_summary(t.preprocess), grid, str(t.channels), codec,
            human_bytes(t.stored_bytes_per_image(codec)), human_bytes(2 * t.tokens * t.channels),
        ])  # fmt: skip
    headers = [
        "teacher",
        "family",
        "source",
        "layer",
        "preprocess",
        "grid",
        "channels",
        "codec",
        "stored/img",
        "bf16/img",
    ]
    per_image = d.bytes_per_image()
    lines = [
        f"dry run: {len(d.teachers)} teachers, nothing loaded; device {cfg.device}, {cfg.num_workers} worker(s), "
        f"batch {cfg.batch_size}",
        table(headers, rows),
        "* cls teacher: its [CLS] state and attention row are stored too (float32)" if cfg.cls_teacher else "",
        f"per image: {human_bytes(per_image)} stored before zstd (an upper bound on disk)",
        f"cache:     {d.cache_state}",
    ]
    unset = [f"--set teachers.{i}.source=PATH ({t.name})" for i, t in enumerate(d.teachers) if not t.source]
    if unset:  # a family without a default download (eva_vitdet): a real run needs the checkpoint file
        lines.append("source:    not set, a real run needs the checkpoint: " + ", ".join(unset))
    if d.images is None:
        where = f"{cfg.packed}: not packed yet" if cfg.packed else "packed is not set"
        lines.append(f"dataset:   {where}, so no totals (set --packed to the `movekd pack` output)")
    else:
        todo = d.images - d.images_committed
        lines += [
            f"dataset:   {d.images} unique images in {d.num_shards} shards (+ the no-image row); "
            f"{len(d.committed)} shards committed, {d.num_shards - len(d.committed)} to do",
            f"budget:    {human_bytes(per_image * (d.images + 1))} for the whole cache, "
            f"{human_bytes(per_image * todo)} still to write",
        ]
    return "\n".join(line for line in lines if line)
