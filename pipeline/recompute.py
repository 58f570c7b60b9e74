"""The recompute spot check: re-run a cache's teachers on random committed images and compare.

``recompute_check(location, n)`` is what ``movekd cache verify --recompute N`` runs. Checksums
prove that a cache holds what its writer wrote; only running the teachers again shows that the
writer wrote the right thing (the right teacher, weights and preprocessing for each key).

Decisions:
- The teachers come from the extraction config recorded in the manifest (``notes.extract_config``:
  family, source, arch, model_kwargs, resolution, aspect, alpha, ...), or from ``config`` (an
  ``ExtractConfig``, e.g. a preset whose checkpoint paths point where the checkpoints are now).
  Either way the cache's codecs and CLS teacher are used, and a teacher whose ``compute_dtype`` is
  ``auto`` runs in the dtype the manifest records (bf16 for a GPU extraction), so the recompute does
  what the extraction did.
- Each rebuilt teacher's manifest entry is compared with the cache's: a different weights
  fingerprint is named as such (these are not the weights that wrote the cache), any other
  difference (preprocessing, layer, dtype) is a problem naming the field, a different ``source``
  alone is a note (a moved checkpoint is fine when its weights are the same), and a different
  grid or channel count makes that teacher impossible to compare (reported, skipped).
- The images are read from the pack the config names (``packed``, or the ``packed`` argument when
  it moved); a pack whose fingerprint is not the manifest's ``dataset_fingerprint`` is a problem.
- The fresh outputs go through the extraction worker's own path (``ShardExtractor.compute``:
  decode, preprocess, teacher, zeroing, codec), so they are exactly what an extraction would store
  now; the comparison, bounds and report are ``cache.spotcheck``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from cache.codecs import get_codec
from cache.layout import CLS_ATTN, CLS_STATE, TEACHERS
from cache.manifest import CacheManifest, diff_dicts
from cache.marker import NULL_KEY
from cache.reader import FeatureCache
from cache.spotcheck import AUX_CODEC, ArrayCheck, RecomputeReport, bound_of, sample_keys
from pipeline.extract_config import ExtractConfig
from pipeline.packed_dataset import PackedDataset

SHAPE_FIELDS = ("tokens", "grid", "channels", "native_grid", "resample", "codec")


def recompute_config(
    manifest: CacheManifest,
    location: str,
    config: ExtractConfig | None = None,
    packed: str | None = None,
    device: str = "auto",
) -> ExtractConfig:
    """The extraction config that recomputes ``manifest``'s cache: its teachers (from ``config``
    or the manifest's recorded config), its codecs and CLS teacher, its recorded compute dtypes.
    ``ValueError`` says what is missing."""
    if config is None:
        recorded = manifest.notes.get("extract_config")
        if not recorded:
            raise ValueError(
                "the manifest records no extraction config (notes.extract_config): pass --config EXTRACT_CONFIG"
            )
        try:
            config = ExtractConfig.from_dict(recorded)
        except ValueError as e:
            raise ValueError(
                f"this movekd cannot rebuild the extraction config recorded in the manifest ({e}); "
                "pass --config EXTRACT_CONFIG"
            ) from None
    specs = {t.name: t for t in config.teachers}
    missing = [n for n in manifest.teacher_names if n not in specs]
    if missing:
        raise ValueError(f"the config has no teacher(s) {missing}; the cache has {list(manifest.teacher_names)}")
    teachers = []
    for entry in manifest.teachers:
        spec = specs[entry.name]
        if spec.compute_dtype == "auto":
            spec = dataclasses.replace(spec, compute_dtype=entry.compute_dtype)
        if os.path.isabs(spec.source) and not os.path.exists(spec.source):
            raise ValueError(
                f"teacher {entry.name}: checkpoint {spec.source} does not exist here; pass --config "
                "EXTRACT_CONFIG naming where it is now"
            )
        teachers.append(spec)
    packed = packed or config.packed
    if not packed:
        raise ValueError("the config names no pack (packed): pass --packed DIR")
    return dataclasses.replace(
        config,
        teachers=tuple(teachers),
        codec=manifest.teachers[0].codec,
        codecs={t.name: t.codec for t in manifest.teachers},
        cls_teacher=manifest.cls_teacher,
        packed=str(packed),
        out=location,
        device=device,
        progress=False,
    )


class Recompute:
    """A recompute of the cache at ``location``, prepared: config resolved, pack opened, teachers
    loaded (``ValueError`` for what the user must fix), so a caller can fail fast before a long
    integrity pass. ``run`` samples, recomputes and compares. ``config``: an ``ExtractConfig`` to
    take the teachers from instead of the manifest's recorded one (``config_name`` names it)."""

    def __init__(
        self,
        location: str | os.PathLike,
        config: ExtractConfig | None = None,
        packed: str | None = None,
        device: str = "auto",
        tolerance: float = 0.0,
        config_name: str | None = None,
    ):
        from pipeline.extract_worker import ShardExtractor, resolve_device

        if tolerance < 0:
            raise ValueError(f"--tolerance must be >= 0, got {tolerance}")
        self.cache = FeatureCache(location)
        self.cfg = recompute_config(self.cache.manifest, self.cache.location.url, config, packed, device)
        self.tolerance = tolerance
        recorded = "the extraction config recorded in the manifest"
        self.config_name = config_name or (recorded if config is None else "the given extraction config")
        self.device = resolve_device(device)
        try:
            self.pack = PackedDataset(self.cfg.packed)
        except ValueError as e:
            raise ValueError(f"cannot read the images to recompute: {e}; pass --packed DIR if the pack moved") from None
        try:
            self.extractor = ShardExtractor(self.cfg)
        except Exception as e:  # noqa: BLE001 - any loader failure is the user's config, named in one line
            raise ValueError(f"cannot load the teachers of {self.config_name}: {type(e).__name__}: {e}") from e

    def run(self, n: int, seed: int = 0, skip_shards: Iterable[int] = (), progress: bool = True) -> RecomputeReport:
        """Recompute ``n`` random committed valid images (by ``seed``; ``skip_shards``, e.g. the
        damaged ones, left out) plus the no-image row, and compare each with the cache."""
        if n < 1:
            raise ValueError(f"--recompute needs a number of images >= 1, got {n}")
        cache, m, cfg = self.cache, self.cache.manifest, self.cfg
        report = RecomputeReport(cache.location.url, self.config_name, cfg.packed, self.device, seed, self.tolerance)
        if self.pack.fingerprint != m.dataset_fingerprint:
            report.problems.append(
                f"the pack at {cfg.packed} is not the one this cache was extracted from (fingerprint "
                f"{self.pack.fingerprint[:16]}, manifest {m.dataset_fingerprint[:16]})"
            )
        keys = [k for k in sample_keys(cache, n, seed, skip_shards) if _in_pack(self.pack, k, report)]
        if not keys:
            report.problems.append("no committed valid image to recompute")
        checks = _compare_entries(m, self.extractor.describe(), report, self.tolerance)
        rows = [*keys, *_null_key(cache, skip_shards, report)]
        bar = tqdm(total=len(rows), desc="recompute", unit="img", disable=not progress)
        for i in range(0, len(rows), cfg.batch_size):
            chunk = rows[i : i + cfg.batch_size]
            _compare(cache, self._fresh(chunk), checks, report)
            bar.update(len(chunk))
        bar.close()
        report.keys, report.checks = rows, list(checks.values())
        for c in report.checks:
            if c.skipped is None and c.over:
                report.problems.append(
                    f"{c.name} ({c.codec}): {c.over} of {c.images} image(s) differ from the recompute by more than "
                    f"the bound {c.bound:.1e}; worst {c.worst_key!r}: rel. MSE {c.worst_error:.3g}"
                )
        return report

    def _fresh(self, chunk: list[str]):
        """What an extraction would store for ``chunk`` (image keys, the no-image row last)."""
        images = [k for k in chunk if k != NULL_KEY]
        fresh = self.extractor.compute(self.pack.read_images(images)) if images else None
        if NULL_KEY in chunk:
            null = self.extractor.compute_null()
            fresh = null if fresh is None else _join(fresh, null)
        return fresh


def recompute_check(
    location: str | os.PathLike,
    n: int,
    seed: int = 0,
    config: ExtractConfig | None = None,
    packed: str | None = None,
    device: str = "auto",
    tolerance: float = 0.0,
    skip_shards: Iterable[int] = (),
    progress: bool = True,
) -> RecomputeReport:
    """The spot check in one call: ``Recompute(location, ...).run(n, seed, skip_shards)``."""
    return Recompute(location, config, packed, device, tolerance).run(n, seed, skip_shards, progress)


def _in_pack(pack: PackedDataset, key: str, report: RecomputeReport) -> bool:
    try:
        pack.ordinal(key)
        return True
    except ValueError:
        report.problems.append(f"image {key!r} of the cache is not in the pack at {pack.root}")
        return False


def _null_key(cache: FeatureCache, skip_shards: Iterable[int], report: RecomputeReport) -> list[str]:
    m = cache.manifest
    if not cache.is_valid(NULL_KEY) or m.num_shards in set(skip_shards):
        return []
    if m.null_input != "black":
        report.notes.append(
            f"the no-image row holds the {m.null_input!r} input of an older movekd: not recomputed "
            "(`movekd extract --rewrite-null-row` upgrades it)"
        )
        return []
    return [NULL_KEY]


def _compare_entries(m: CacheManifest, rebuilt: list[dict], report: RecomputeReport, tolerance: float) -> dict:
    """One ``ArrayCheck`` per teacher (and aux array); differences between the rebuilt teachers'
    manifest entries and the cache's go to the report."""
    checks = {}
    for entry, new in zip(m.teachers, rebuilt):
        name = entry.name
        check = checks[name] = ArrayCheck(name, entry.codec, bound_of(entry.codec) + tolerance)
        for path, have, got in diff_dicts(entry.to_dict(), new):
            if path == "source":
                report.notes.append(f"teacher {name}: loaded from {got} (the manifest records {have})")
            elif path == "weights_fingerprint":
                report.problems.append(
                    f"teacher {name}: the loaded weights are not the ones that wrote this cache: weights fingerprint "
                    f"{got} (from {new['source']}), manifest {have}"
                )
            else:
                report.problems.append(f"teacher {name}: rebuilt with {path}={got!r}, the manifest records {have!r}")
                if path.split(".")[0] in SHAPE_FIELDS:
                    check.skipped = f"{path} differs"
    if m.cls_teacher is not None:
        for path in (CLS_STATE, CLS_ATTN):
            checks[path] = ArrayCheck(path, AUX_CODEC, bound_of(AUX_CODEC) + tolerance)
            checks[path].skipped = checks[m.cls_teacher].skipped
    return checks


def _join(a, b):
    """Two ``ShardExtractor.compute`` results as one (rows of ``a``, then ``b``)."""
    keys, failed = a[0] + b[0], {**a[1], **b[1]}
    enc = {t: {c: np.concatenate([v, b[2][t][c]]) for c, v in parts.items()} for t, parts in a[2].items()}
    cls = tuple(None if x is None else np.concatenate([x, y]) for x, y in zip(a[3], b[3]))
    return keys, failed, enc, cls


def _compare(cache: FeatureCache, fresh, checks: dict, report: RecomputeReport) -> None:
    keys, failed, encoded, (cls_state, cls_attn) = fresh
    for key, why in failed.items():
        report.problems.append(f"image {key!r}: the recompute failed ({why}) but the cache holds it as valid")
    ok = np.array([k not in failed for k in keys], dtype=bool)
    keys = [k for k in keys if k not in failed]
    if not keys:
        return
    m = cache.manifest
    rows = np.array([cache.row(k) for k in keys], dtype=np.int64)
    stored = cache.read(keys)
    for t in m.teachers:
        check = checks[t.name]
        if check.skipped:
            continue
        codec = get_codec(t.codec)
        parts = {c: v[ok] for c, v in encoded[t.name].items()}
        same = np.ones(len(keys), dtype=bool)
        for comp in codec.components(t.tokens, t.channels):
            raw = cache.read_rows(f"{TEACHERS}/{t.name}/{comp.name}", rows)
            same &= (raw == parts[comp.name]).reshape(len(keys), -1).all(axis=1)
        check.add(keys, stored.features[t.name], codec.decode(parts), same)
    for path, got, new in ((CLS_STATE, stored.cls_state, cls_state), (CLS_ATTN, stored.cls_attn, cls_attn)):
        if path in checks and not checks[path].skipped:
            new = new[ok].astype(np.float32)
            checks[path].add(keys, got, new, (got == new).reshape(len(keys), -1).all(axis=1))


__all__ = ["Recompute", "recompute_check", "recompute_config"]
