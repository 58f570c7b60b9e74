"""Extraction never waits forever for workers the cluster cannot place: the resource check
refuses in one line before any teacher loads (before: the real presets' ``device: cuda`` on a
machine without GPUs waited on Ray's "No available node types can fulfill resource request"),
and a worker that does not start within ``worker_start_timeout_s`` is an error."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.config import load_config
from pipeline.extract_ray import check_cluster


def _cfg(**kw):
    return dataclasses.replace(load_config("tiny", {"packed": "/p", "out": "/o"}), **kw)


@pytest.mark.parametrize(
    "kw, have, message",
    [
        (
            {"device": "cuda", "num_workers": 1},
            {"CPU": 16.0},
            "asked 1 x 1 GPU, 1 x 1 CPU, it has 0 GPU, 16 CPU; set device=cpu",
        ),
        ({"device": "cpu", "num_workers": 5}, {"CPU": 2.0}, "asked 5 x 1 CPU, it has 2 CPU; set num_workers <= 2"),
        ({"device": "cpu", "num_workers": 1, "cpus_per_worker": 4.0}, {"CPU": 2.0}, "set cpus_per_worker <= 2"),
        ({"device": "cuda", "num_workers": 8}, {"CPU": 64.0, "GPU": 4.0}, "set num_workers <= 4"),
    ],
)
def test_unplaceable_workers_are_refused(kw, have, message):
    with pytest.raises(ValueError, match="the Ray cluster cannot place the extraction workers") as e:
        check_cluster(_cfg(**kw), have)
    assert message in str(e.value)


def test_placeable_workers_pass():
    check_cluster(_cfg(device="cpu", num_workers=2), {"CPU": 2.0})
    check_cluster(_cfg(device="cuda", num_workers=2, gpus_per_worker=0.5), {"CPU": 2.0, "GPU": 1.0})
    check_cluster(_cfg(device="cpu", num_workers=1), {"CPU": 1.0})


def test_a_worker_that_does_not_start_in_time_is_an_error(monkeypatch):
    """The pool waits for every actor's start with a timeout, then names what was asked."""
    import ray

    import pipeline.extract_ray as er

    class FakeActor:
        class __ray_ready__:  # noqa: N801 - Ray's builtin actor method name
            @staticmethod
            def remote():
                return "ref"

    class FakeCls:
        def remote(self, *a):
            return FakeActor()

    killed = []
    monkeypatch.setattr(ray, "remote", lambda cls: type("R", (), {"options": lambda self, **k: FakeCls()})())
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: ([], refs))
    monkeypatch.setattr(ray, "get", lambda refs: [])
    monkeypatch.setattr(ray, "kill", lambda a, no_restart: killed.append(a))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = _cfg(device="cpu", num_workers=2, worker_start_timeout_s=5.0)
    with pytest.raises(ValueError, match=r"2 of 2 extraction workers did not start within 5 s"):
        er._ActorPool(cfg)
    assert len(killed) == 2
