"""The movekd feature cache: a versioned Zarr v3 format for cached teacher outputs.

Public API::

    from cache import CacheManifest, TeacherEntry, PreprocessSpec   # what produced a cache
    from cache import CacheWriter, open_cache, verify_cache         # write / read / check
    from cache import open_caches                                   # several caches of one pack
    from cache import get_codec, list_codecs                        # storage presets

This package depends on numpy, zarr, numcodecs, fsspec and PIL only (no torch, no ray): it is
the contract between extraction (pipeline/) and training (student/). See cache/FORMAT.md.
"""

from cache.codecs import Codec, NonFiniteError, get_codec, list_codecs
from cache.manifest import (
    FORMAT_VERSION,
    CacheManifest,
    ManifestError,
    ManifestMismatchError,
    PreprocessSpec,
    TeacherEntry,
)
from cache.marker import NULL_KEY, ShardCommit
from cache.multi import CacheUnion, open_caches
from cache.reader import CacheBatch, CacheError, FeatureCache, open_cache
from cache.stats import compute_channel_stats
from cache.verify import VerifyReport, verify_cache
from cache.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "NULL_KEY",
    "CacheBatch",
    "CacheError",
    "CacheManifest",
    "CacheUnion",
    "CacheWriter",
    "Codec",
    "FeatureCache",
    "ManifestError",
    "ManifestMismatchError",
    "NonFiniteError",
    "PreprocessSpec",
    "ShardCommit",
    "TeacherEntry",
    "VerifyReport",
    "compute_channel_stats",
    "get_codec",
    "list_codecs",
    "open_cache",
    "open_caches",
    "verify_cache",
]
