"""What a person reads during and after an extraction: the progress bar and the summary.

A real in-process run (tiny CLIP teacher, 6 images in 2 data shards plus the reserved no-image
row) with the progress bar on, its output caught; and the bar driven with a slow clock, as at
real size where one image takes seconds.
"""

from __future__ import annotations

import contextlib
import io
import re
import types

import pytest

from pipeline import extract_report
from pipeline.extract import extract_in_process
from pipeline.extract_config import ExtractConfig
from pipeline.extract_report import ExtractReport, ShardTracker, summarize
from pipeline.extract_worker import ShardExtractor
from pipeline.teachers.tiny import make_tiny_teachers
from tests.helpers.datasets import pack_crops


def last_render(text: str) -> str:
    """The bar as it stands: tqdm redraws in place with carriage returns."""
    return re.split(r"[\r\n]+", text.rstrip("\r\n"))[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(report, the bar when the no-image row started, the bar at the end)."""
    tmp = tmp_path_factory.mktemp("readout")
    clip = make_tiny_teachers(tmp / "tiny", families=["clip"])[0]
    packed = pack_crops(str(tmp / "data"), n=6, shard_size=4)
    cfg = ExtractConfig(packed=packed.root, out=str(tmp / "cache"), teachers=(clip,), progress=True)
    err = io.StringIO()
    seen = {}
    with contextlib.redirect_stderr(err):  # the bar writes to sys.stderr as it is when it is made
        worker = ShardExtractor(cfg)
        real = worker.process

        def process(shard, replace=False):
            if shard == packed.num_shards:  # the no-image row starts now
                seen["at_null_row"] = last_render(err.getvalue())
            return real(shard, replace)

        worker.process = process
        report = extract_in_process(cfg, worker)
    assert report.ok
    return report, seen["at_null_row"], last_render(err.getvalue())


def test_the_bar_reaches_100_percent_only_when_the_no_image_row_is_done(run):
    _, at_null_row, final = run
    assert "100%" not in at_null_row and "6/7" in at_null_row, at_null_row
    assert "100%" in final and "7/7" in final, final
    assert "no-image row" in final


def test_the_summary_counts_images_without_the_no_image_row(run):
    report, _, _ = run
    text = summarize(report)
    assert "images: 6 processed, 0 failed" in text, text
    assert report.to_dict()["images_processed"] == 6 and report.to_dict()["no_image_row"] == "written"
    assert [ln for ln in text.splitlines() if ln.startswith("no-image row")] == [
        "no-image row (the black input of text-only rows): written"
    ], text


def test_a_slow_rate_reads_as_seconds_per_image(monkeypatch):
    """At real size an image takes seconds: the bar says s/img, never 0.0 img/s."""
    now = [1000.0]
    monkeypatch.setattr(extract_report, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        tracker = ShardTracker(ExtractReport("c", 3), [0, 1, 2], images=8, num_shards=2, progress=True)
        now[0] += 100.0  # 4 images in 100 s
        tracker.done(0, {"images": 4, "failed": {}})
        tracker.close()
    bar = last_render(err.getvalue())
    assert "0.0" not in bar.split("failed=")[-1], bar
    assert "25.0 s/img" in bar, bar


def test_rate_format():
    from pipeline.extract_report import format_rate

    assert format_rate(4, 100.0) == "25.0 s/img"
    assert format_rate(250, 100.0) == "2.50 img/s"
    assert format_rate(12_000, 100.0) == "120 img/s"
    assert format_rate(0, 10.0) == "-" and format_rate(3, 0.0) == "-"
