"""Planning an extraction run: the manifest, the cache check and the shards still to do.

``plan(cfg, teachers)`` builds the manifest from the loaded teachers' entries (fingerprints,
grids), creates the cache or checks an existing one against it *before* any shard is processed
(resuming with a different teacher set, codec or preprocessing is refused with the differing
fields named), and lists the shards to do. The in-process and the Ray runner both start from it
(``pipeline.extract``), so they write identical caches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cache.manifest import CacheManifest, TeacherEntry
from cache.store import Location
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

    def new_report(self) -> ExtractReport:
        return ExtractReport(self.cache, self.manifest.num_shards + 1, list(self.committed))


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
    cfg: ExtractConfig, teachers: Sequence[TeacherEntry | dict], packed: PackedDataset | None = None
) -> ExtractPlan:
    """Create (or open and check) ``cfg.out`` for ``teachers`` and list the shards to do.

    ``teachers`` are the manifest entries of the loaded teachers (``ShardExtractor.describe()``).
    Raises ``ManifestMismatchError`` naming every differing field when the cache exists with
    another configuration."""
    packed = packed or check_inputs(cfg)
    manifest = build_manifest(cfg, packed, teachers)
    writer = CacheWriter.create(cfg.out, manifest)
    done = writer.committed_shards()
    todo = tuple(s for s in range(manifest.num_shards + 1) if s not in done)
    images = sum(len(packed.keys_in_shard(s)) for s in todo if s < manifest.num_shards)
    log.info("cache %s: %d of %d shards committed, %d to do", cfg.out, len(done), manifest.num_shards + 1, len(todo))
    return ExtractPlan(writer.manifest, Location(cfg.out).url, tuple(sorted(done)), todo, images)
