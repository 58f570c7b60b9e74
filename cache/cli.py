"""Inspection CLI for a feature cache: ``python -m cache COMMAND`` or ``movekd cache COMMAND``.

Commands: ``inspect`` (what is in a cache and what it costs on disk), ``verify`` (integrity),
``show`` (statistics of one image), ``attn`` (the [CLS] attention of one image as a PNG) and
``stats`` (compute and store per-teacher channel statistics).

Decisions:
- ``add_parser(subparsers)`` registers the ``cache`` verb for ``jobs/cli.py``; ``main(argv)`` is the
  same commands without the verb. The parsers are built in one function, so both agree.
- User errors (missing cache, wrong format version, unknown key or teacher, unreadable image)
  print one line to stderr and exit 2 (``movekd -v`` re-raises them with the traceback);
  ``verify`` exits 1 when it finds problems, 0 when clean.
- ``inspect``'s numbers come from ``cache.summary`` (bytes on disk against raw bf16).
- Pictures use matplotlib's object API on a bare ``Figure`` (Agg), never pyplot, so no global
  backend state is touched; the image under ``attn --image`` goes through the teacher's own preprocessing,
  following the CLS teacher's ``PreprocessSpec``, so the grid lines up with what the teacher saw.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Mapping

import numpy as np

from cache.layout import STATS_FILE
from cache.manifest import PreprocessSpec, TeacherEntry
from cache.marker import NULL_KEY
from cache.preprocess import preprocess_image
from cache.reader import FeatureCache, load_manifest, open_cache
from cache.stats import compute_channel_stats
from cache.store import Location
from cache.summary import format_inspect, inspect_cache
from cache.text import table
from cache.verify import VerifyReport, verify_cache


class CliError(Exception):
    """A user error reported as one line (exit 2)."""


Extension = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]


# -- parsers ---------------------------------------------------------------------------------


def add_parser(subparsers, extensions: Mapping[str, Extension] | None = None) -> argparse.ArgumentParser:
    """Register the ``cache`` verb on a ``movekd`` sub-parser collection.

    ``extensions`` maps a command name to ``extend(parser) -> run``: it adds options to that
    command's parser and returns the function that runs the command instead (wrapped in the same
    one-line error handling). ``movekd`` adds ``verify --recompute`` this way (``jobs.cache_cli``),
    which needs the teachers and so cannot live here."""
    parser = subparsers.add_parser(
        "cache", help="inspect, verify and summarise a feature cache", description=__doc__.split("\n\n")[0]
    )
    _add_commands(parser, extensions or {})
    return parser


def build_parser(prog: str = "python -m cache") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    _add_commands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def _add_commands(parser: argparse.ArgumentParser, extensions: Mapping[str, Extension] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", metavar="PATH", help="cache location: a directory or an fsspec URL (memory://, s3://)")
    common.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    sub = parser.add_subparsers(dest="cache_command", metavar="COMMAND")
    p = sub.add_parser("inspect", parents=[common], help="teachers, images, shards and size of a cache")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.set_defaults(func=functools.partial(_guarded, _cmd_inspect))
    p = sub.add_parser("verify", parents=[common], help="check completeness, checksums and decodability")
    p.add_argument("--sample", type=int, default=16, metavar="N", help="images to decode end to end (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the sampled images (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=functools.partial(_guarded, _cmd_verify))
    p = sub.add_parser("show", parents=[common], help="per-teacher statistics of one image")
    p.add_argument("key", metavar="KEY", help=f"image key (the no-image row is {NULL_KEY!r})")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=functools.partial(_guarded, _cmd_show))
    p = sub.add_parser("attn", parents=[common], help="draw one image's [CLS] attention as a PNG heatmap")
    p.add_argument("key", metavar="KEY", help=f"image key (the no-image row is {NULL_KEY!r})")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")
    p.add_argument("--image", metavar="FILE", help="draw the heatmap over this image, cropped as the teacher saw it")
    p.add_argument("--alpha", type=float, default=0.6, help="heatmap opacity over --image, 0..1 (default 0.6)")
    p.set_defaults(func=functools.partial(_guarded, _cmd_attn))
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
        if getattr(args, "verbose", False):  # `movekd -v cache ...`: show the traceback
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


# -- show ------------------------------------------------------------------------------------


def _require_key(cache: FeatureCache, key: str) -> None:
    if key not in cache:
        hint = "; the no-image row has not been written" if key == NULL_KEY else ""
        raise CliError(
            f"image key {key!r} is not in any committed shard of {cache.location.url} "
            f"({len(cache)} readable keys){hint}"
        )
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


def attention_stats(attn: np.ndarray, teacher: TeacherEntry) -> dict:
    """Entropy (nats, of the row normalised to sum 1), max, and argmax as (row, col) of the grid."""
    a = attn.astype(np.float64)
    total = a.sum()
    p = a / total if total > 0 else np.full_like(a, 1.0 / a.size)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    arg = int(a.argmax())
    return {
        "teacher": teacher.name,
        "grid": list(teacher.grid),
        "sum": float(total),
        "entropy": entropy,
        "max_entropy": float(np.log(a.size)),
        "max": float(a.max()),
        "argmax_token": arg,
        "argmax_rc": list(divmod(arg, teacher.grid[1])),
    }


def _cmd_show(args) -> int:
    info = image_stats(open_cache(args.path), args.key)
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
    _require_key(cache, args.key)
    teacher = m.teacher(m.cls_teacher)
    heat = cache.read([args.key], teachers=[]).cls_attn[0].reshape(teacher.grid)
    picture = teacher_view(_load_image(args.image), teacher.preprocess) if args.image else None
    draw_attention(heat, args.out, f"{args.key}  [CLS] attention of {teacher.name}", picture, args.alpha)
    print(f"wrote {args.out}")
    return 0


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise CliError(f"cannot read image {path}: {e}") from e


def teacher_view(image, spec: PreprocessSpec) -> np.ndarray:
    """The picture a teacher saw (uint8 HxWx3): its exact preprocessing, un-normalised."""
    x = preprocess_image(image, spec)
    mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
    return (np.clip(x * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def draw_attention(
    heat: np.ndarray, out: str, title: str, picture: np.ndarray | None = None, alpha: float = 0.6
) -> None:
    """Save ``heat`` (grid rows x cols) as a PNG heatmap with a colorbar, over ``picture`` if given."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch

    fig = Figure(figsize=(5.5, 4.6), dpi=100)
    ax = fig.add_subplot()
    if picture is None:
        im = ax.imshow(heat, cmap="inferno", interpolation="nearest")
    else:
        h, w = picture.shape[:2]
        ax.imshow(picture, extent=(0, w, h, 0))
        im = ax.imshow(heat, cmap="inferno", alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear")
    solid = ScalarMappable(norm=im.norm, cmap=im.cmap)  # the colorbar without the overlay's alpha
    fig.colorbar(solid, ax=ax, label="head-mean [CLS] attention")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.savefig(out, format="png")


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
