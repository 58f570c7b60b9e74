"""Rewrite only the reserved no-image row of an existing cache (``movekd extract --rewrite-null-row``).

Format 1 caches hold the teachers' outputs for all-zero normalised pixels in their no-image row;
the released MoVE-KD input is a black image through each teacher's own preprocessing
(``cache.preprocess.null_image_tensor``). Every other row is unaffected, so re-extracting the
whole cache would waste the teachers' time on a one-row fix.

Decisions:
- The teachers are built from the same extraction config as the cache, and the cache's manifest
  must match what that config produces in everything but ``format_version``, ``null_input`` and
  ``preprocess.alpha`` (``CacheWriter.open_for_null_row``): the same weights, preprocessing and
  codecs, or the rewritten row would not belong to the cache. The data rows keep their alpha
  mode in the manifest (format 1 composited alpha onto white), so a trainer sees what they hold.
- The row is computed by the extraction worker's own code path (``ShardExtractor.process`` of
  the reserved shard), so it is exactly what a fresh extraction writes.
"""

from __future__ import annotations

import logging

from cache.writer import CacheWriter
from pipeline.extract_config import ExtractConfig
from pipeline.extract_plan import build_manifest

log = logging.getLogger(__name__)


def rewrite_null_row(cfg: ExtractConfig, extractor=None) -> dict:
    """Recompute and commit the no-image row of ``cfg.out`` and upgrade its manifest; returns the
    worker's summary of that one-row shard. ``extractor``: a ``ShardExtractor`` for ``cfg``
    whose teachers are already loaded (optional)."""
    from pipeline.extract_worker import ShardExtractor

    cfg.require_io()
    extractor = extractor or ShardExtractor(cfg)
    requested = build_manifest(cfg, extractor.packed, extractor.describe())
    writer = CacheWriter.open_for_null_row(cfg.out, requested)
    extractor.use_writer(writer)
    summary = extractor.process(writer.manifest.num_shards)
    log.info("rewrote the no-image row of %s (null_input=%s)", writer.location.url, writer.manifest.null_input)
    return summary
