"""Fixtures for the cache tests: manifests, stores (local and in-memory), synthetic caches.

``store`` is parametrized over a local directory (``tmp_path``) and an fsspec ``memory://`` URL
unique to the test (removed afterwards), zarr-python style, so a test that takes it runs on both.
``built_cache`` is one complete synthetic cache per test module (read-only by convention);
tests that corrupt or rewrite a cache build their own with ``synth.build_cache``.
"""

from __future__ import annotations

import uuid

import fsspec
import pytest

from tests.cache import synth


@pytest.fixture
def manifest():
    return synth.make_manifest()


@pytest.fixture
def memory_url():
    url = f"memory://movekd-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    root = url[len("memory://") :]
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    """A fresh cache location: a local path or a unique memory:// URL."""
    if request.param == "local":
        return str(tmp_path / "cache")
    return request.getfixturevalue("memory_url")


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A complete cache (3 data shards, one failed image, no-image row) on local disk."""
    path = str(tmp_path_factory.mktemp("built") / "cache")
    manifest = synth.build_cache(path)
    return path, manifest
