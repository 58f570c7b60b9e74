"""The ``movekd cache`` verb: the inspection CLI lives with the format, in ``cache/cli.py``.

``movekd`` adds one thing to it: ``verify --recompute N``, which re-runs the teachers on N random
committed images and compares them with the cache (``pipeline.recompute``). That needs torch and
the teacher loaders, so it is wired here, through ``cache.cli``'s extension hook, and imports
them only when ``--recompute`` is given: ``movekd cache`` stays free of torch otherwise.
"""

from __future__ import annotations

import argparse
import json

from cache import cli as cache_cli

RECOMPUTE_OPTIONS = ("config", "packed", "device", "tolerance")


def add_parser(subparsers) -> argparse.ArgumentParser:
    return cache_cli.add_parser(subparsers, extensions={"verify": add_recompute_options})


def add_recompute_options(p: argparse.ArgumentParser):
    """``verify``'s recompute options; returns the function that runs ``verify``."""
    g = p.add_argument_group("recompute spot check (movekd only; loads the teachers)")
    g.add_argument(
        "--recompute",
        type=int,
        metavar="N",
        help="also re-run the teachers on N random committed valid images (chosen with --seed) plus the no-image "
        "row and compare each with the cache within its codec's bound (cache/FORMAT.md section 7): catches a "
        "wrong teacher, wrong weights or wrong preprocessing behind valid checksums",
    )
    g.add_argument(
        "--config",
        metavar="EXTRACT_CONFIG",
        help="with --recompute: take the teachers from this extraction preset or YAML instead of the config "
        "recorded in the manifest (e.g. when the checkpoints moved); codecs and CLS teacher stay the cache's",
    )
    g.add_argument(
        "--packed",
        metavar="DIR",
        help="with --recompute: read the images from this pack instead of the one the manifest's config names "
        "(when it moved)",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="with --recompute: where the teachers run (default auto: cuda when available)",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="REL_MSE",
        help="with --recompute: added to every bound (default 0), for compute noise when a bf16 cache is "
        "recomputed on other hardware, e.g. 1e-3",
    )
    return run_verify


def run_verify(args: argparse.Namespace) -> int:
    """``verify``, plus the recompute spot check when ``--recompute`` is given; exit 1 when either
    finds a problem. The recompute is prepared (config, pack, teachers) before the integrity pass,
    so a user error stops the command at once."""
    if args.recompute is None:
        given = [f"--{k}" for k in RECOMPUTE_OPTIONS if getattr(args, k) is not None]
        if given:
            raise cache_cli.CliError(f"{', '.join(given)}: only with --recompute N")
    elif args.recompute < 1:
        raise cache_cli.CliError(f"--recompute needs a number of images >= 1, got {args.recompute}")
    recompute = _prepare(args) if args.recompute else None
    report = cache_cli.run_verify(args)
    result = None
    if recompute is not None:
        result = recompute.run(args.recompute, args.seed, skip_shards=report.damaged, progress=not args.no_progress)
    ok = report.ok and (result is None or result.ok)
    if args.json:
        out = report.to_dict()
        if result is not None:
            out |= {"ok": ok, "recompute": result.to_dict()}
        print(json.dumps(out, indent=2))
    else:
        print(cache_cli.format_verify(report))
        if result is not None:
            print("\n" + result.format())
    return 0 if ok else 1


def _prepare(args: argparse.Namespace):
    from jobs.cli import prepare_torch

    prepare_torch()
    from pipeline.recompute import Recompute

    config = None
    if args.config:
        from jobs.config import load_config

        config = load_config(args.config, kind="extract")
    return Recompute(
        args.path,
        config=config,
        packed=args.packed,
        device=args.device or "auto",
        tolerance=args.tolerance or 0.0,
        config_name=f"--config {args.config}" if args.config else None,
    )


__all__ = ["add_parser"]
