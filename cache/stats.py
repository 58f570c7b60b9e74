"""Per-teacher channel statistics (mean/std over every valid token), stored for the trainer.

Computed in one streaming pass, shard by shard, with float64 sums (Chan's parallel update of
mean and M2, so large caches do not lose precision), and written atomically to ``stats.json``;
computing a subset of teachers replaces only their entries and keeps the others'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from cache.layout import STATS_FILE
from cache.reader import FeatureCache


def compute_channel_stats(
    cache: FeatureCache, teachers: Iterable[str] | None = None, progress: bool = True, write: bool = True
) -> dict[str, dict]:
    names = list(cache.manifest.teacher_names if teachers is None else teachers)
    acc = {
        n: [0, np.zeros(cache.manifest.teacher(n).channels), np.zeros(cache.manifest.teacher(n).channels)]
        for n in names
    }
    images = 0
    for shard in tqdm(cache.committed_shards, desc="channel stats", unit="shard", disable=not progress):
        keys = [k for k in cache.commits[shard].keys if cache.is_valid(k)]
        if not keys:
            continue
        batch = cache.read(keys, teachers=names, aux=False)
        images += len(keys)
        for n in names:
            x = batch.features[n].reshape(-1, batch.features[n].shape[-1]).astype(np.float64)
            _merge(acc[n], len(x), x.mean(axis=0), ((x - x.mean(axis=0)) ** 2).sum(axis=0))
    out = {
        n: {
            "mean": acc[n][1].tolist(),
            "std": np.sqrt(acc[n][2] / max(acc[n][0], 1)).tolist(),
            "tokens": acc[n][0],
            "images": images,
        }
        for n in names
    }
    if write:
        # a subset updates its teachers and keeps the others' (stats --teachers a must not drop b)
        old = cache.location.read_bytes(STATS_FILE)
        kept = json.loads(old).get("teachers", {}) if old else {}
        doc = {"computed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "teachers": {**kept, **out}}
        cache.location.write_atomic(STATS_FILE, json.dumps(doc).encode())
    return out


def _merge(state: list, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
    n_a, mean_a, m2_a = state
    n = n_a + n_b
    delta = mean_b - mean_a
    state[0] = n
    state[1] = mean_a + delta * (n_b / n)
    state[2] = m2_a + m2_b + delta**2 * (n_a * n_b / n)
