"""``movekd export SRC OUT``: convert a student between this project's export format and the
released MoVE-KD / LLaVA checkpoint layout.

- ``SRC`` is a project export (``movekd train``'s ``export/``, with ``movekd_student.json``) or a
  released MoVE-KD checkpoint folder (``config.json`` with ``model_type: move_llava_llama``).
- ``--format movekd`` (default) writes the project's format (``student.export``): a released
  checkpoint becomes usable by ``movekd generate/answer``.
- ``--format llava`` writes the released layout (``student.released.export_llava``): config.json,
  safetensors shards with the released key names and the tokenizer, which the released MoVE-KD /
  LLaVA eval scripts load (``load_pretrained_model``) unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "Convert a trained student: project export <-> released MoVE-KD/LLaVA checkpoint layout."
LLAVA_TOWER = "openai/clip-vit-large-patch14-336"  # LLaVA-1.5's (and MoVE-KD's) CLIP tower
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a project export dir or a released MoVE-KD checkpoint folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (replaced atomically)")
    p.add_argument("--format", choices=("movekd", "llava"), default="movekd", help="output layout (default: movekd)")
    p.add_argument(
        "--mm-vision-tower",
        default=None,
        metavar="NAME|DIR",
        help="llava: config.json's mm_vision_tower, where LLaVA loads the CLIP config and image processor "
        f"(default: a released SRC's own, else {LLAVA_TOWER})",
    )
    p.add_argument(
        "--vision-tower",
        default=None,
        metavar="NAME|DIR",
        help="released SRC: read the CLIP config from here instead of its mm_vision_tower",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="llava: cast the weights (default: as stored)")
    p.add_argument("--no-adapters", action="store_true", help="llava: leave the KD adapters out")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert a student to/from the released LLaVA layout", description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None


def load_source(src: str, vision_tower: str | None):
    """-> (model, tokenizer or None, inference dict, mm_vision_tower or None) from either layout."""
    from student.export import META, load_pretrained, read_metadata
    from student.released import load_released, read_released_config, released_inference

    path = Path(src)
    if (path / META).is_file():
        meta = read_metadata(path)
        return load_pretrained(path), _tokenizer(path / "tokenizer"), meta.get("inference"), None
    if (path / "config.json").is_file():
        rc = read_released_config(path)
        model = load_released(path, vision_tower=vision_tower)
        return model, _tokenizer(path), released_inference(path, vision_tower), rc.mm_vision_tower
    raise ValueError(f"{src}: neither a movekd export ({META}) nor a released checkpoint (config.json)")


def run(args: argparse.Namespace) -> int:
    import torch

    from jobs.cli import user_error
    from student.export import export_pretrained
    from student.released import export_llava

    try:
        model, tokenizer, inference, tower = load_source(args.src, args.vision_tower)
        if args.format == "movekd":
            out = export_pretrained(model, args.out, tokenizer, inference)
        else:
            tower = args.mm_vision_tower or tower or LLAVA_TOWER
            aspect = ((inference or {}).get("preprocess") or {}).get("aspect", "pad")
            dtype = getattr(torch, args.dtype) if args.dtype else None
            out = export_llava(
                model,
                args.out,
                tower,
                tokenizer=tokenizer,
                image_aspect_ratio=aspect,
                dtype=dtype,
                include_adapters=not args.no_adapters,
            )
            print(f"mm_vision_tower: {tower}")
    except ValueError as e:
        return user_error("movekd export", e)
    print(f"wrote {args.format} layout to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_module

    return run_module("python -m jobs.export", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
