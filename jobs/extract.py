"""``movekd extract`` / ``python -m jobs.extract``: run the teachers over packed shards into a cache.

Locally this starts an embedded Ray cluster on 127.0.0.1. On a cluster, submit it as a Ray job::

    ray job submit --working-dir . -- python -m jobs.extract --config jobs/configs/movekd_v1_0_pretrain.yaml

(``ray job submit`` exports RAY_ADDRESS; this entry point then joins that cluster.)

Configs are resolved by ``jobs.config`` (presets, ``base:`` chains, ``--set``, the ``tiny_teachers``
block that makes small random-weight teachers for the bundled sample). ``--dry-run`` prints the
plan, shapes and disk budget without loading a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

log = logging.getLogger("movekd.extract")

HELP = """Run every teacher once per unique image of a packed dataset and write the feature cache.
Resumes by itself: shards already committed in the cache are skipped; a cache written with a
different configuration (teachers, codec, preprocessing, dataset) is refused. Two runs on one
cache share its shards (each claims a shard before working on it). A damaged cache is repaired
with --repair. A full disk stops the run with one line naming the path and the free space."""


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
    p.add_argument(
        "--teachers",
        metavar="A,B",
        help="extract only these teachers of the config (comma-separated names), e.g. --teachers sam for a "
        "SAM-only cache of a pack that a v1.0 cache already covers; train from both with cache: [v1.0, sam]. "
        "The [CLS] rows are kept only when the config's cls_teacher is among them",
    )
    p.add_argument("--report", help="also write the machine-readable run report (JSON) here")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars (logs stay)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument(
        "--rewrite-null-row",
        action="store_true",
        help="recompute only the cache's no-image row (the released black input) and upgrade its manifest: "
        "the fix for a cache written by an older movekd with the all-zero input (cache/FORMAT.md section 2)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="also re-extract every committed shard that `movekd cache verify` finds damaged (unusable marker, "
        "missing or truncated data file, checksum mismatch), and only those; reads the whole cache once",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan without loading any model: each teacher's source, preprocessing, token grid, "
        "channels, codec and bytes per image, the shards already committed and to do, and the disk budget",
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="run the teachers over packed shards into a feature cache", description=HELP
    )
    add_arguments(p)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> ExtractConfig:  # noqa: F821
    from jobs.config import load_config, parse_overrides

    overrides = parse_overrides(
        args.overrides, packed=args.packed, out=args.out, num_workers=args.workers, report=args.report
    )
    if args.no_progress:
        overrides["progress"] = False
    cfg = load_config(args.config, overrides, kind="extract")
    if getattr(args, "teachers", None):
        cfg = select_teachers(cfg, args.teachers)
    if cfg.ray_address is None and os.environ.get("RAY_ADDRESS"):
        cfg = dataclasses.replace(cfg, ray_address="auto")  # started by `ray job submit`: join that cluster
    return cfg


def select_teachers(cfg, spec: str):
    """``cfg`` with only the teachers named in ``spec`` (comma-separated, config order kept); the
    [CLS] teacher stays only if selected. Unknown names are a ``ValueError`` listing the config's."""
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    names = [t.name for t in cfg.teachers]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise ValueError(f"--teachers {spec!r}: {unknown or 'no names'} not among the config's teachers {names}")
    keep = tuple(t for t in cfg.teachers if t.name in wanted)
    cls = cfg.cls_teacher if cfg.cls_teacher in wanted else None
    return dataclasses.replace(cfg, teachers=keep, cls_teacher=cls)


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for an entry point started by `ray job submit`


def relative_paths_in_a_ray_job(cfg, env=None) -> str | None:
    """Under ``ray job submit --working-dir``, the entry point runs in the job's uploaded copy of
    the working dir, deleted with the job: a relative ``packed``/``out`` would read from or write
    the cache into that copy. Returns the error to show, or None."""
    from cache.store import is_url

    if RAY_JOB_ENV not in (os.environ if env is None else env):
        return None
    rel = [f"{k}={v}" for k, v in (("packed", cfg.packed), ("out", cfg.out)) if v and not is_url(str(v))]
    rel = [r for r in rel if not os.path.isabs(r.split("=", 1)[1])]
    if not rel:
        return None
    return (
        f"{', '.join(rel)}: in a `ray job submit` job a relative path points into the job's uploaded copy of "
        f"the working dir, which is deleted with the job; pass absolute paths (or URLs) seen by every node"
    )


def run(args: argparse.Namespace) -> int:
    from cache.manifest import ManifestMismatchError
    from jobs.cli import user_error
    from jobs.config import CONFIG_ERRORS

    try:
        cfg = resolve_config(args)
    except CONFIG_ERRORS as e:
        return user_error("movekd extract", f"bad config: {e}")
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    problem = relative_paths_in_a_ray_job(cfg)
    if problem:
        return user_error("movekd extract", problem)
    if args.dry_run:
        from pipeline.extract_describe import describe_extraction, format_description

        try:
            print(format_description(describe_extraction(cfg)))
        except ValueError as e:
            return user_error("movekd extract", e)
        return 0
    if args.rewrite_null_row:
        return _rewrite_null_row(cfg)
    from pipeline.extract import run_extraction, summarize

    try:
        report = run_extraction(cfg, repair=args.repair)
    except ManifestMismatchError as e:
        return user_error("movekd extract", f"refusing to resume: {e}")
    except ValueError as e:  # a config that cannot run (e.g. no packed/out), named by the message
        return user_error("movekd extract", e)
    print(summarize(report, repair_command(args)))
    if report.stopped:
        print(f"movekd extract: {report.stopped}", file=sys.stderr)
    return 0 if report.ok else 1


def _rewrite_null_row(cfg) -> int:
    from cache.manifest import ManifestMismatchError
    from jobs.cli import user_error
    from pipeline.extract_null import rewrite_null_row

    try:
        summary = rewrite_null_row(cfg)
    except ManifestMismatchError as e:
        return user_error("movekd extract --rewrite-null-row", f"this config did not produce the cache: {e}")
    except ValueError as e:
        return user_error("movekd extract --rewrite-null-row", e)
    print(f"rewrote the no-image row of {cfg.out} in {summary['seconds']:.1f} s (manifest null_input=black)")
    return 0


def repair_command(args: argparse.Namespace) -> str:
    """This run's own command line with --repair: what re-extracts the damaged shards."""
    parts = ["movekd extract", f"--config {args.config}"]
    parts += [f"--set {o}" for o in args.overrides]
    parts += [f"--{k} {v}" for k in ("packed", "out") if (v := getattr(args, k))]
    return " ".join([*parts, "--repair"])


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_module

    return run_module("python -m jobs.extract", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
