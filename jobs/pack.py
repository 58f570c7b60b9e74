"""``movekd pack``: LLaVA JSON files + an image folder -> WebDataset shards of unique images.

Only parses arguments and prints the summary; the work is ``pipeline.packing.pack_dataset``.
Bad rows and bad files never fail the command (they are in ``report.json``); a bad argument or
an unreadable JSON file does (exit code 2, message on stderr).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.image_checks import DEFAULT_MAX_PIXELS
from pipeline.packing import DEFAULT_SHARD_SIZE, format_summary, pack_dataset


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pack",
        help="pack a LLaVA JSON + image folder into WebDataset shards of unique images",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE.json",
        help="a LLaVA-format JSON file; repeat for several (names must differ)",
    )
    p.add_argument("--image-root", required=True, metavar="DIR", help="folder the JSON 'image' paths are relative to")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumable)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help=f"images per shard (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="threads for hashing/decoding checks and shard writing (default: CPUs, at most 8)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"reject images of more than N pixels (width x height) as too_large, read from the header "
        f"before decoding: a decompression-bomb guard (default {DEFAULT_MAX_PIXELS:,}, Pillow's own "
        "threshold; a larger N is recorded in the index and allowed wherever the pack is read)",
    )
    p.add_argument("--name", default=None, help="dataset name for the index (default: JSON stems)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        result = pack_dataset(
            args.data,
            args.image_root,
            args.out,
            shard_size=args.shard_size,
            workers=args.workers,
            name=args.name,
            progress=not args.no_progress,
            max_pixels=args.max_pixels,
        )
    except ValueError as e:
        print(f"movekd pack: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    if result.num_images == 0:
        print(
            f"movekd pack: error: nothing was packed: none of the {result.counts.get('rows', 0)} rows has a usable "
            f"image (why, per row: {result.report_path}); check --image-root and the JSON's image paths",
            file=sys.stderr,
        )
        return 1
    return 0
