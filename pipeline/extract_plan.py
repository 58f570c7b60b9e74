"""Planning an extraction run: the manifest, the cache check and the shards still to do.

``plan(cfg, teachers)`` builds the manifest from the loaded teachers' entries (fingerprints,
grids), creates the cache or checks an existing one against it *before* any shard is processed
(resuming with a different teacher set, codec or preprocessing is refused with the differing
fields named), and lists the shards to do. The in-process and the Ray runner both start from it
(``pipeline.extract``), so they write identical caches.

A shard counts as committed only when its marker is readable (``FeatureCache`` parses every
marker); a damaged one is never counted silently: without ``repair`` it is reported (the run
ends non-zero and names ``--repair``), with ``repair`` every shard ``verify`` finds damaged
(``cache.verify.damaged_shards``: unusable marker, missing/truncated file, checksum) is
re-extracted, and only those.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cache.layout import COMMITS, MARKER_NAME
from cache.manifest import CacheManifest, TeacherEntry
from cache.reader import FeatureCache
from cache.store import Location
from cache.verify import damaged_shards
from cache.writer import CacheWriter
from pipeline.extract_config import ExtractConfig
from pipeline.extract_report import ExtractReport
from pipeline.packed_dataset import PackedDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractPlan:
    """What a run will do: the cache's manifest, which shards are committed and which to do."""

    manifest: CacheManifest
    cache: str  # the cache's URL
    committed: tuple[int, ...]
    todo: tuple[int, ...]
    images_todo: int  # images in the data shards of ``todo`` (the no-image row not counted)
    repair: tuple[int, ...] = ()  # damaged shards in ``todo``, rewritten over their markers
    damaged: dict | None = None  # shard -> why it is damaged, when not repairing (reported, not redone)

    def new_report(self) -> ExtractReport:
        report = ExtractReport(self.cache, self.manifest.num_shards + 1, list(self.committed))
        report.shards_damaged = dict(self.damaged or {})
        report.shards_repaired = list(self.repair)
        return report


def build_manifest(cfg: ExtractConfig, packed: PackedDataset, teachers: Sequence[TeacherEntry | dict]) -> CacheManifest:
    """The manifest of ``cfg``'s cache over ``packed``, from the loaded teachers' entries."""
    return CacheManifest(
        teachers=tuple(t if isinstance(t, TeacherEntry) else TeacherEntry.from_dict(t) for t in teachers),
        num_shards=packed.num_shards,
        shard_size=packed.shard_size,
        dataset_fingerprint=packed.fingerprint,
        dataset_name=cfg.dataset_name,
        cls_teacher=cfg.cls_teacher,
        notes={"extract_config": cfg.to_dict()},
    )


def check_inputs(cfg: ExtractConfig) -> PackedDataset:
    """What extraction needs, checked before any teacher is loaded (minutes on a real node): the
    paths are set, ``packed`` is a finished pack, and it holds at least one image."""
    cfg.require_io()
    packed = PackedDataset(cfg.packed)
    if packed.num_images == 0 or packed.num_shards == 0:
        raise ValueError(
            f"pack {cfg.packed} holds no images (its report, {packed.report_path}, says why each row was "
            "skipped): nothing to extract; fix the image paths and pack again"
        )
    return packed


def plan(
    cfg: ExtractConfig,
    teachers: Sequence[TeacherEntry | dict],
    packed: PackedDataset | None = None,
    repair: bool = False,
) -> ExtractPlan:
    """Create (or open and check) ``cfg.out`` for ``teachers`` and list the shards to do.

    ``teachers`` are the manifest entries of the loaded teachers (``ShardExtractor.describe()``).
    Raises ``ManifestMismatchError`` naming every differing field when the cache exists with
    another configuration. ``repair``: also re-extract every shard ``verify`` finds damaged."""
    packed = packed or check_inputs(cfg)
    manifest = build_manifest(cfg, packed, teachers)
    writer = CacheWriter.create(cfg.out, manifest)
    n = writer.manifest.num_shards
    reader = FeatureCache(cfg.out)
    bad_markers = {}
    for name, why in reader.marker_problems.items():
        shard = int(MARKER_NAME.fullmatch(name).group(1))
        if shard <= n:
            bad_markers[shard] = f"unusable commit marker {COMMITS}/{name} ({why})"
    damaged = {s: "; ".join(p) for s, p in damaged_shards(cfg.out, cfg.progress).items()} if repair else {}
    done = {s for s in reader.commits if s <= n} - set(damaged)
    if repair:
        todo = tuple(s for s in range(n + 1) if s not in done)
        unreported = {}
    else:
        todo = tuple(s for s in range(n + 1) if s not in done and s not in bad_markers)
        unreported = bad_markers
    images = sum(len(packed.keys_in_shard(s)) for s in todo if s < n)
    log.info("cache %s: %d of %d shards committed, %d to do", cfg.out, len(done), n + 1, len(todo))
    for shard, why in sorted({**unreported, **damaged}.items()):
        log.warning("shard %d is damaged: %s%s", shard, why, "; re-extracting it" if repair else "")
    repaired = tuple(sorted(set(damaged) | (set(bad_markers) if repair else set())))
    return ExtractPlan(writer.manifest, Location(cfg.out).url, tuple(sorted(done)), todo, images, repaired, unreported)
