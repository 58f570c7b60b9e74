"""Inspection CLI for a feature cache: ``python -m cache COMMAND`` or ``movekd cache COMMAND``.

Commands: ``inspect`` (what is in a cache and what it costs on disk), ``verify`` (integrity),
``keys`` (the image keys, one per line), ``show`` (statistics of one image), ``attn`` (the [CLS]
attention of one image as a PNG) and ``stats`` (compute and store per-teacher channel statistics).

Decisions:
- ``add_parser(subparsers, image_lookup)`` registers the ``cache`` verb for ``jobs/cli.py``;
  ``main(argv)`` is the same commands without the verb. The parsers are built in one function, so
  both agree. Help texts are plain text (they are read in a terminal): no markup.
- ``show``/``attn`` take an image key; a name that is not a key goes to an ``ImageLookup`` when
  one is given. Keys are the pack's business (the first 16 hex digits of the image's sha256), and
  cache/ cannot import pipeline/, so ``movekd cache`` passes one (``jobs.cache_cli``: the pack's
  index, then the file's content) and ``python -m cache`` takes keys only, saying so.
- User errors (missing cache, wrong format version, unknown key or teacher, unreadable image)
  print one line to stderr and exit 2 (``movekd --debug`` re-raises them with the traceback);
  ``verify`` exits 1 when it finds problems, 0 when clean. ``keys`` stops quietly (exit 0) when
  its reader goes away (``| head``).
- ``inspect``'s numbers come from ``cache.summary``, the pictures from ``cache.heatmap``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import numpy as np

from cache.heatmap import attention_stats, draw_attention, load_image, teacher_view
from cache.layout import STATS_FILE
from cache.marker import NULL_KEY
from cache.reader import FeatureCache, load_manifest, open_cache
from cache.stats import compute_channel_stats
from cache.store import Location
from cache.summary import format_inspect, inspect_cache
from cache.text import table
from cache.verify import VerifyReport, verify_cache

DESCRIPTION = (
    "Inspect a feature cache: what it holds and costs on disk (inspect), its integrity (verify), "
    "its image keys (keys), one image (show, attn), channel statistics (stats)."
)
KEYS_DESCRIPTION = (
    "Print the image keys of the committed data shards, one per line, in row order, failed images "
    f"included (they keep their rows). The no-image row ({NULL_KEY}) is not listed: it is not an "
    "image. With --failed: only the failed images, each as KEY, a tab, and the reason."
)

__all__ = [
    "CliError",
    "ImageLookup",
    "add_parser",
    "attention_stats",
    "build_parser",
    "draw_attention",
    "image_stats",
    "main",
    "resolve_key",
    "teacher_view",
]


class CliError(Exception):
    """A user error reported as one line (exit 2)."""


Extension = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]


# -- parsers ---------------------------------------------------------------------------------


class ImageLookup(Protocol):
    """Maps a name that is not a key (an image path) to a key; ``jobs.cache_cli`` has the one
    ``movekd cache`` uses."""

    help: str  # how KEY may name an image, for the help of show/attn

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def __call__(self, cache: FeatureCache, name: str, args) -> tuple[str | None, list[str]]:
        """(key, notes to print) when found; (None, what was tried and why it failed) otherwise."""


def add_parser(
    subparsers, image_lookup: ImageLookup | None = None, extensions: Mapping[str, Extension] | None = None
) -> argparse.ArgumentParser:
    """Register the ``cache`` verb on a ``movekd`` sub-parser collection.

    ``image_lookup`` maps image paths to keys for ``show``/``attn``. ``extensions`` maps a command
    name to ``extend(parser) -> run``: it adds options to that command's parser and returns the
    function that runs the command instead (wrapped in the same one-line error handling).
    ``movekd`` adds both (``jobs.cache_cli``): the pack lookup and ``verify --recompute``, which
    need pipeline/ and the teachers and so cannot live here."""
    parser = subparsers.add_parser(
        "cache", help="inspect, verify and summarise a feature cache", description=DESCRIPTION
    )
    _add_commands(parser, image_lookup, extensions or {})
    return parser


def build_parser(prog: str = "python -m cache") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    _add_commands(parser, None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def _add_commands(
    parser: argparse.ArgumentParser, lookup: ImageLookup | None, extensions: Mapping[str, Extension] | None = None
) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", metavar="PATH", help="cache location: a directory or an fsspec URL (memory://, s3://)")
    common.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    key_help = f"image key (the no-image row is {NULL_KEY}); " + (
        lookup.help if lookup is not None else "image paths are looked up by movekd cache, which reads the pack"
    )
    sub = parser.add_subparsers(dest="cache_command", metavar="COMMAND")
    p = sub.add_parser("inspect", parents=[common], help="teachers, images, shards and size of a cache")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (every field) instead of tables")
    p.set_defaults(func=functools.partial(_guarded, _cmd_inspect))
    p = sub.add_parser("verify", parents=[common], help="check completeness, checksums and decodability")
    p.add_argument("--sample", type=int, default=16, metavar="N", help="images to decode end to end (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the sampled images (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=functools.partial(_guarded, _cmd_verify))
    p = sub.add_parser("keys", parents=[common], help="list the image keys, one per line", description=KEYS_DESCRIPTION)
    p.add_argument("--failed", action="store_true", help="only the failed images, as KEY<tab>REASON")
    p.add_argument("--shard", type=int, metavar="N", help="only data shard N (0 .. num_shards - 1)")
    p.set_defaults(func=functools.partial(_guarded, _cmd_keys))
    p = sub.add_parser("show", parents=[common], help="per-teacher statistics of one image")
    p.add_argument("key", metavar="KEY", help=key_help)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=functools.partial(_guarded, _cmd_show), image_lookup=lookup)
    if lookup is not None:
        lookup.add_arguments(p)
    p = sub.add_parser("attn", parents=[common], help="draw one image's [CLS] attention as a PNG heatmap")
    p.add_argument("key", metavar="KEY", help=key_help)
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")
    p.add_argument("--image", metavar="FILE", help="draw the heatmap over this image, cropped as the teacher saw it")
    p.add_argument("--alpha", type=float, default=0.6, help="heatmap opacity over --image, 0..1 (default 0.6)")
    p.set_defaults(func=functools.partial(_guarded, _cmd_attn), image_lookup=lookup)
    if lookup is not None:
        lookup.add_arguments(p)
    p = sub.add_parser("stats", parents=[common], help="compute and store per-teacher channel mean/std")
    p.add_argument("--teachers", metavar="A,B", help="comma-separated teachers (default: all)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=functools.partial(_guarded, _cmd_stats))
    parser.set_defaults(func=functools.partial(_no_command, parser))
    for name, extend in (extensions or {}).items():
        command = sub.choices[name]
        command.set_defaults(func=functools.partial(_guarded, extend(command)))


def _no_command(parser: argparse.ArgumentParser, args) -> int:
    parser.print_help(sys.stderr)
    return 2


def _guarded(command, args) -> int:
    """Run ``command``; user errors become one line on stderr and exit code 2."""
    try:
        return command(args)
    except (CliError, ValueError, KeyError, OSError) as e:
        if getattr(args, "debug", False) or getattr(args, "verbose", False):  # movekd --debug / -v
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {'; '.join(line.strip() for line in str(msg).splitlines() if line.strip())}", file=sys.stderr)
        return 2


# -- inspect ---------------------------------------------------------------------------------


def _cmd_inspect(args) -> int:
    info = inspect_cache(open_cache(args.path))
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


# -- verify ----------------------------------------------------------------------------------


def _cmd_verify(args) -> int:
    report = run_verify(args)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_verify(report))
    return 0 if report.ok else 1


def run_verify(args) -> VerifyReport:
    """The integrity checks of ``verify`` for parsed ``args`` (``path``, ``sample``, ``seed``,
    ``no_progress``); a missing cache or a wrong format version raises (exit 2, not a finding)."""
    load_manifest(Location(args.path))
    return verify_cache(args.path, sample=args.sample, seed=args.seed, progress=not args.no_progress)


def format_verify(report: VerifyReport) -> str:
    lines = [f"PROBLEM {p}" for p in report.problems] + [f"NOTE {n}" for n in report.notes]
    status = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
    lines.append(
        f"{status}: {report.shards_committed}/{report.shards_total} shards committed (incl. the no-image "
        f"row), {report.shards_checked} checked, {report.rows_sampled} images decoded"
    )
    return "\n".join(lines)


# -- keys ------------------------------------------------------------------------------------


def _cmd_keys(args) -> int:
    cache = open_cache(args.path)
    n = cache.manifest.num_shards
    shards = cache.committed_shards
    if args.shard is not None:
        if not 0 <= args.shard < n:
            raise CliError(
                f"--shard {args.shard}: the data shards of {cache.location.url} are 0..{n - 1} "
                f"(shard {n} holds only the no-image row, key {NULL_KEY})"
            )
        if args.shard not in cache.commits:
            raise CliError(
                f"shard {args.shard} is not committed in {cache.location.url}, so its keys are not visible "
                f"({len(shards)}/{n} data shards committed)"
            )
        shards = [args.shard]
    failed = cache.failed()
    keys = (k for s in shards for k in cache.commits[s].keys)
    if args.failed:
        return _print_lines(f"{k}\t{' '.join(failed[k].split())}" for k in keys if k in failed)
    return _print_lines(keys)


def _print_lines(lines: Iterable[str]) -> int:
    """One line each to stdout; a reader that goes away (``| head``) ends the listing quietly."""
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # the interpreter's last flush would fail again: point stdout at /dev/null first
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    return 0


# -- show ------------------------------------------------------------------------------------


def resolve_key(cache: FeatureCache, name: str, lookup: ImageLookup | None = None, args=None) -> str:
    """``name`` when it is a key of ``cache``; otherwise what ``lookup`` maps it to, or a one-line
    error naming every attempt."""
    if name in cache:
        return name
    not_key = f"{name!r} is not an image key of {cache.location.url} ({len(cache)} keys)"
    if name == NULL_KEY:
        raise CliError(f"{not_key}: the no-image row has not been written")
    if lookup is None:
        command = getattr(args, "cache_command", None) or "show"
        raise CliError(f"{not_key}; image paths are looked up by movekd cache {command}, which reads the pack")
    key, messages = lookup(cache, name, args)
    if key is None:
        raise CliError("; ".join([not_key, *messages]))
    for message in messages:
        print(f"note: {message}", file=sys.stderr)
    if key not in cache:
        raise CliError(f"{name!r} is image {key}, but {key} is not in any committed shard of {cache.location.url}")
    return key


def _require_key(cache: FeatureCache, key: str) -> None:
    resolve_key(cache, key)
    if not cache.is_valid(key):
        raise CliError(f"image {key!r} failed extraction ({cache.failed()[key]}); it has no features")


def image_stats(cache: FeatureCache, key: str) -> dict:
    """Per-teacher statistics of one image (and its [CLS] attention), as a JSON-ready dict."""
    _require_key(cache, key)
    batch = cache.read([key])
    out = {"key": key, "row": int(batch.rows[0]), "teachers": {}}
    for name, x in batch.features.items():
        x = x[0].astype(np.float64)
        out["teachers"][name] = {
            "shape": list(x.shape),
            "codec": cache.manifest.teacher(name).codec,
            "mean": float(x.mean()),
            "std": float(x.std()),
            "min": float(x.min()),
            "max": float(x.max()),
            "absmax": float(np.abs(x).max()),
            "token_l2_mean": float(np.linalg.norm(x, axis=1).mean()),
        }
    if batch.cls_attn is not None:
        out["cls_attn"] = attention_stats(batch.cls_attn[0], cache.manifest.teacher(cache.manifest.cls_teacher))
        out["cls_state"] = {"shape": list(batch.cls_state[0].shape), "l2": float(np.linalg.norm(batch.cls_state[0]))}
    return out


def _cmd_show(args) -> int:
    cache = open_cache(args.path)
    info = image_stats(cache, resolve_key(cache, args.key, args.image_lookup, args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"image {info['key']!r} (row {info['row']})")
    rows = [
        [n, "x".join(map(str, s["shape"])), s["codec"]]
        + [f"{s[k]:.4g}" for k in ("mean", "std", "min", "max", "absmax", "token_l2_mean")]
        for n, s in info["teachers"].items()
    ]
    print(table(["teacher", "shape", "codec", "mean", "std", "min", "max", "absmax", "L2/token"], rows))
    if "cls_attn" in info:
        a = info["cls_attn"]
        print(
            f"\n[CLS] attention ({a['teacher']}, grid {a['grid'][0]}x{a['grid'][1]}): sum {a['sum']:.4g}, "
            f"entropy {a['entropy']:.4g} nats (uniform {a['max_entropy']:.4g}), max {a['max']:.4g} "
            f"at (row {a['argmax_rc'][0]}, col {a['argmax_rc'][1]})"
        )
        if a["max_x_uniform"] is not None:
            print(f"  max {a['max_x_uniform']:.3g} x uniform, min {a['min_x_uniform']:.3g} x uniform (1/N of the sum)")
        print(f"[CLS] state: {'x'.join(map(str, info['cls_state']['shape']))}, L2 {info['cls_state']['l2']:.4g}")
    return 0


# -- attn ------------------------------------------------------------------------------------


def _cmd_attn(args) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha must be within 0..1, got {args.alpha}")
    cache = open_cache(args.path)
    m = cache.manifest
    if m.cls_teacher is None:
        raise CliError(
            f"{cache.location.url} has no cls teacher (manifest cls_teacher is null): no [CLS] attention is stored"
        )
    key = resolve_key(cache, args.key, args.image_lookup, args)
    _require_key(cache, key)
    teacher = m.teacher(m.cls_teacher)
    heat = cache.read([key], teachers=[]).cls_attn[0].reshape(teacher.grid)
    picture = teacher_view(load_image(args.image), teacher.preprocess) if args.image else None
    draw_attention(heat, args.out, f"{key}  [CLS] attention of {teacher.name}", picture, args.alpha)
    print(f"wrote {args.out}")
    return 0


# -- stats -----------------------------------------------------------------------------------


def _cmd_stats(args) -> int:
    cache = open_cache(args.path)
    names = _teacher_list(cache, args.teachers)
    if not any(cache.is_valid(k) for s in cache.committed_shards for k in cache.commits[s].keys):
        raise CliError(f"{cache.location.url} has no valid images in committed shards: nothing to compute")
    out = compute_channel_stats(cache, names, progress=not args.no_progress)
    if args.json:
        print(
            json.dumps(
                {n: {k: v for k, v in s.items() if k in ("tokens", "images")} | _summary(s) for n, s in out.items()},
                indent=2,
            )
        )
        return 0
    rows = [
        [n, str(s["images"]), str(s["tokens"]), str(len(s["mean"]))] + [f"{v:.4g}" for v in _summary(s).values()]
        for n, s in out.items()
    ]
    print(
        table(
            [
                "teacher",
                "images",
                "tokens",
                "channels",
                "mean min",
                "mean avg",
                "mean max",
                "std min",
                "std avg",
                "std max",
            ],
            rows,
        )
    )
    print(f"wrote {STATS_FILE} in {cache.location.url}")
    return 0


def _teacher_list(cache: FeatureCache, spec: str | None) -> list[str]:
    names = list(cache.manifest.teacher_names)
    if not spec:
        return names
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise CliError(f"unknown teacher(s) {unknown or spec!r}; this cache has {names}")
    return wanted


def _summary(s: dict) -> dict:
    mean, std = np.asarray(s["mean"]), np.asarray(s["std"])
    return {
        "mean_min": float(mean.min()),
        "mean_avg": float(mean.mean()),
        "mean_max": float(mean.max()),
        "std_min": float(std.min()),
        "std_avg": float(std.mean()),
        "std_max": float(std.max()),
    }
