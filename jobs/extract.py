"""``movekd extract`` / ``python -m jobs.extract``: run the teachers over packed shards into a cache.

Locally this starts an embedded Ray cluster on 127.0.0.1. On a cluster, submit it as a Ray job::

    ray job submit --working-dir . -- python -m jobs.extract --config jobs/configs/movekd_v1_0_pretrain.yaml

(``ray job submit`` exports RAY_ADDRESS; this entry point then joins that cluster.)

A config may carry a ``tiny_teachers`` block (``{dir: ..., families: [...]}``): the entry point
creates small random-weight models of those families in ``dir`` (if missing) and uses them as the
teachers. That is how the bundled sample runs without any downloaded weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger("movekd.extract")

HELP = """Run every teacher once per unique image of a packed dataset and write the feature cache.
Resumes by itself: shards already committed in the cache are skipped; a cache written with a
different configuration (teachers, codec, preprocessing, dataset) is refused."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="YAML config: a file path or a preset name from jobs/configs (e.g. tiny, movekd_v1_0_pretrain)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (dotted keys, YAML values), e.g. --set out=/data/cache "
        "--set batch_size=32 --set teachers.1.resolution=448; repeatable",
    )
    p.add_argument("--packed", help="shortcut for --set packed=DIR: the `movekd pack` output directory")
    p.add_argument("--out", help="shortcut for --set out=PATH: the cache location (path or fsspec URL)")
    p.add_argument("--workers", type=int, help="shortcut for --set num_workers=N: actors to start")
    p.add_argument("--report", help="also write the machine-readable run report (JSON) here")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars (logs stay)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="run the teachers over packed shards into a feature cache", description=HELP
    )
    add_arguments(p)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> ExtractConfig:  # noqa: F821
    from pipeline.extract_config import ExtractConfig, load_yaml_config, parse_override

    overrides = dict(parse_override(o) for o in args.overrides)
    for key, value in (
        ("packed", args.packed),
        ("out", args.out),
        ("num_workers", args.workers),
        ("report", args.report),
    ):
        if value is not None:
            overrides[key] = value
    if args.no_progress:
        overrides["progress"] = False
    data = load_yaml_config(args.config, overrides)
    data = materialize_tiny_teachers(data)
    if data.get("ray_address") is None and os.environ.get("RAY_ADDRESS"):
        data["ray_address"] = "auto"  # started by `ray job submit`: join that cluster
    return ExtractConfig.from_dict(data)


def materialize_tiny_teachers(data: dict[str, Any]) -> dict[str, Any]:
    """Replace a ``tiny_teachers`` block by the specs of freshly made (or existing) tiny models."""
    tiny = data.pop("tiny_teachers", None)
    if tiny is None:
        return data
    from pipeline.teachers.tiny import make_tiny_teachers

    specs = make_tiny_teachers(tiny["dir"], families=tiny.get("families"))
    data["teachers"] = [s.to_dict() for s in specs]
    return data


def run(args: argparse.Namespace) -> int:
    from pipeline.extract import run_extraction, summarize

    try:
        cfg = resolve_config(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"movekd extract: bad config: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from cache.manifest import ManifestMismatchError

    try:
        report = run_extraction(cfg)
    except ManifestMismatchError as e:
        print(f"movekd extract: refusing to resume: {e}", file=sys.stderr)
        return 2
    print(summarize(report))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_module

    return run_module("python -m jobs.extract", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
