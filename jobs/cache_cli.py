"""The ``movekd cache`` verb: the inspection CLI lives with the format, in ``cache/cli.py``; this
module adds what needs pipeline/, which cache/ cannot import: naming an image by its path, and
``verify --recompute N``.

``verify --recompute N`` re-runs the teachers on N random committed images and compares them with
the cache (``pipeline.recompute``). It needs torch and the teacher loaders, so it is wired here
through ``cache.cli``'s extension hook and imports them only when ``--recompute`` is given:
``movekd cache`` stays free of torch otherwise.

``show``/``attn`` take an image key or a path; a name that is not a key of the cache is tried:

1. in the pack's index (``PackedDataset.key_for_path``, the packer's own normalisation): as
   given (the path in the LLaVA JSON, relative to the image root), then, for an existing file,
   as its location relative to the pack's recorded image root. The pack is ``--packed DIR``, else
   the one ``movekd extract`` recorded in the manifest's notes (``extract_config.packed``).
2. by content: an existing file's key is the first 16 hex digits of its sha256, as the packer
   derives it. This needs no pack (moved, deleted, on another machine) and maps any copy of the
   bytes, wherever it lies; identical bytes under several paths are one image anyway.

The pack's mapping comes first because it is what training uses for a path; when the file at that
path (as given, or under the image root) no longer has the packed bytes, a note says so. Anything else is one
line naming every attempt.
"""

from __future__ import annotations

import argparse
import json
import os

from cache import cli as cache_cli
from cache.reader import FeatureCache

__all__ = ["PackLookup", "add_parser"]

RECOMPUTE_OPTIONS = ("config", "packed", "device", "tolerance")


def add_parser(subparsers) -> argparse.ArgumentParser:
    return cache_cli.add_parser(subparsers, PackLookup(), extensions={"verify": add_recompute_options})


def recorded_pack(cache: FeatureCache) -> str | None:
    """The pack ``movekd extract`` read, as its config named it (None when not recorded)."""
    config = cache.manifest.notes.get("extract_config")
    packed = config.get("packed") if isinstance(config, dict) else None
    return packed if isinstance(packed, str) and packed else None


class PackLookup:
    help = (
        "or an image path: as in the LLaVA JSON (relative to the pack's image root), a file under "
        "the image root, or any file with the same bytes (a key is a hash of the content)"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--packed",
            metavar="DIR",
            help="the movekd pack output to look image paths up in (default: the one recorded by movekd extract)",
        )

    def __call__(self, cache: FeatureCache, name: str, args) -> tuple[str | None, list[str]]:
        from pipeline.packed_dataset import KEY_HEX, file_sha256

        tried = []
        key, packed_file = self._in_pack(cache, name, getattr(args, "packed", None), tried)
        if key is not None:
            on_disk = name if os.path.isfile(name) else packed_file
            content = file_sha256(on_disk)[:KEY_HEX] if on_disk and os.path.isfile(on_disk) else key
            if content == key:
                return key, []
            return key, [
                f"{name}: the file's bytes ({on_disk}) differ from what was packed under this path (content key "
                f"{content}, packed {key}); showing the packed image, which is what training uses"
            ]
        if not os.path.isfile(name):
            tried.append(f"no file {name} to hash")
            return None, tried
        content = file_sha256(name)[:KEY_HEX]
        if content in cache:
            return content, []
        tried.append(f"file {name} has content key {content}, which is not in the cache")
        return None, tried

    def _in_pack(
        self, cache: FeatureCache, name: str, pack: str | None, tried: list[str]
    ) -> tuple[str | None, str | None]:
        """(key, the file the pack read it from) of ``name`` in the pack's index; (None, None)."""
        from pipeline.packed_dataset import PackedDataset

        where = pack or recorded_pack(cache)
        if where is None:
            tried.append("the manifest records no pack to look paths up in (pass --packed DIR)")
            return None, None
        try:
            packed = PackedDataset(where)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
            origin = "" if pack else ", recorded by movekd extract"
            tried.append(f"the pack {where}{origin} is not readable ({' '.join(str(e).split())}; pass --packed DIR)")
            return None, None
        root = packed.index.get("image_root") or ""
        for candidate in _relative_forms(name, root):
            key = packed.key_for_path(candidate)
            if key is not None:
                return key, os.path.join(root, candidate) if root else None
        tried.append(f"not an image path of the pack {packed.root} (image root {root})")
        return None, None


def _relative_forms(name: str, image_root: str) -> list[str]:
    """``name`` as given, then (for an existing path) relative to the image root, if inside it."""
    forms = [name]
    if image_root and os.path.exists(name):
        for path, root in (
            (os.path.abspath(name), os.path.abspath(image_root)),
            (os.path.realpath(name), os.path.realpath(image_root)),
        ):
            if os.path.commonpath([path, root]) == root and path != root:
                forms.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return list(dict.fromkeys(forms))


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
