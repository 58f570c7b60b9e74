"""``cache.spotcheck``, the numpy half of the recompute check: the metric, the bounds, which rows
are sampled, and how the worst image is tracked (the teacher half: tests/pipeline/test_recompute.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cache import NULL_KEY, get_codec, list_codecs, open_cache
from cache.spotcheck import AUX_REL_MSE_BOUND, ArrayCheck, bound_of, rel_mse_rows, sample_keys
from tests.cache import synth


def test_rel_mse_rows_per_image():
    fresh = np.ones((3, 4, 2), np.float32)
    stored = fresh.copy()
    stored[1, 0, 0] = 1.5  # (0.5^2) / 8
    stored[2] = 0.0  # everything lost: 1
    assert rel_mse_rows(stored, fresh).tolist() == [0.0, 0.25 / 8, 1.0]
    zeros = np.zeros((2, 3))
    assert rel_mse_rows(zeros, zeros).tolist() == [0.0, 0.0]  # an all-zero row recomputed as zeros
    assert rel_mse_rows(np.ones((1, 3)), np.zeros((1, 3))).tolist() == [np.inf]
    with pytest.raises(ValueError, match="differ in shape"):
        rel_mse_rows(np.ones((1, 3)), np.ones((1, 4)))


def test_every_codec_and_the_aux_arrays_have_a_bound():
    for name in list_codecs():
        assert bound_of(name) == get_codec(name).rel_mse_bound > 0
    assert bound_of("float32") == AUX_REL_MSE_BOUND == 1e-6


def test_sample_keys_are_valid_committed_and_seeded(tmp_path):
    manifest = synth.build_cache(tmp_path / "c")  # shard 1 holds one failed image
    cache = open_cache(tmp_path / "c")
    valid = [k for k in cache.keys() if cache.is_valid(k) and k != NULL_KEY]
    assert len(valid) == 10
    picked = sample_keys(cache, 4, seed=0)
    assert len(picked) == 4 and set(picked) <= set(valid)
    assert picked == sorted(picked, key=cache.row)  # row order: reads stay local
    assert sample_keys(cache, 4, seed=0) == picked and sample_keys(cache, 4, seed=1) != picked
    assert sample_keys(cache, 100, seed=0) == sorted(valid, key=cache.row)  # never the failed one
    assert not set(sample_keys(cache, 100, 0, skip_shards=[0])) & set(synth.shard_keys(manifest, 0))
    assert sample_keys(cache, 0, 0) == []


def test_array_check_keeps_the_worst_image_and_counts():
    check = ArrayCheck("eva", "int8", bound=1e-4)
    fresh = np.ones((2, 3, 4), np.float32)
    check.add(["a", "b"], fresh, fresh, np.array([True, True]))
    assert check.ok and check.identical == 2 and check.worst_error == 0.0
    stored = fresh.copy()
    stored[1, 0, 0] = 2.0
    check.add(["c", "d"], stored, fresh, np.array([True, False]))
    assert not check.ok and check.images == 4 and check.identical == 3 and check.over == 1
    assert check.worst_key == "d" and check.worst_error == pytest.approx(1 / 12) and check.worst_max_abs == 1.0
    check.add(["e"], fresh[:1], fresh[:1], np.array([True]))  # a better image keeps the worst
    assert check.worst_key == "d" and check.to_dict()["over_bound"] == 1
