"""The ``movekd`` command line: one program, one verb per capability.

Each verb lives in its own module under ``jobs/`` and exposes ``add_parser(subparsers)``, which
registers an ``argparse`` sub-parser whose ``func`` default takes the parsed namespace and
returns an exit code. This file only wires them together, so ``movekd VERB --help`` documents
every option in the module that implements it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import textwrap

# verb -> module; imported lazily so `movekd cache ...` never pays for importing torch or ray.
VERBS = {
    "cache": "jobs.cache_cli",
    "demo": "jobs.demo",
    "pack": "jobs.pack",
    "extract": "jobs.extract",
    "train": "jobs.train",
    "export": "jobs.export",
    "generate": "jobs.inference",
    "answer": "jobs.inference",
    "evaluate": "jobs.inference",
}

# Verbs whose arguments go unparsed to another program's CLI: verb -> module with main(argv).
PASSTHROUGH = {"lmms-eval": "jobs.lmms_plugin.launch"}

# Verbs that never import torch: no torchvision set-up for them.
TORCH_FREE_VERBS = {"cache"}

DESCRIPTIONS = {
    "cache": "inspect, verify and summarise a feature cache",
    "demo": "run the whole pipeline on the bundled sample data",
    "pack": "pack a LLaVA JSON + image folder into WebDataset shards of unique images",
    "extract": "run the teachers over packed shards and write the feature cache (Ray)",
    "train": "train the MoLE student from a feature cache",
    "export": "convert a student to/from the released MoVE-KD/LLaVA checkpoint layout",
    "generate": "answer a prompt (about an image) with a trained student",
    "answer": "answer a LLaVA-format question file (resumable, chunked)",
    "evaluate": "score an answers file: VQA accuracy and exact match",
    "lmms-eval": "run lmms-eval (its own arguments) with the movekd model plugin (needs the eval extra)",
}


_MARKUP = (
    (re.compile(r":[a-z]+:`([^`]+)`"), r"'\1'"),  # RST roles, :func:`x`
    (re.compile(r"``(.+?)``", re.S), r"'\1'"),  # RST literals
    (re.compile(r"`([^`\n]+)`"), r"'\1'"),  # markdown code
    (re.compile(r"\*\*(.+?)\*\*", re.S), r"\1"),  # bold
    (re.compile(r"::$", re.M), ":"),  # RST "literal block follows"
)


def plain_text(text: str) -> str:
    """Docstring markup (RST ````x````, markdown ```x```, ``**x**``) as plain text: code as ``'x'``."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text


class ReadableHelpFormatter(argparse.HelpFormatter):
    """``--help`` from docstrings: markup shown as plain text (``plain_text``); a description keeps
    its paragraphs and its ``- `` bullet items (re-wrapped; argparse's default runs them together)
    and its indented literal blocks (verbatim)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in re.split(r"\n\s*\n", plain_text(textwrap.dedent(text)).strip("\n")):
            if all(line.startswith("    ") for line in para.splitlines()):
                out.append("\n".join(indent + line for line in para.splitlines()))
                continue
            items = re.split(r"\n(?=\s*- )", para)
            lines = []
            for item in items:
                words = " ".join(item.split())
                hang = "  " if words.startswith("- ") else ""
                lines.append(textwrap.fill(words, width, initial_indent=indent, subsequent_indent=indent + hang))
            out.append("\n".join(lines))
        return "\n\n".join(out)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain_text(text), width)


class ReadableArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help is ``ReadableHelpFormatter``'s. Sub-parsers are made with
    the parent's class, so every verb and sub-command (``movekd cache inspect``) gets it too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", ReadableHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(verbs: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = ReadableArgumentParser(
        prog="movekd",
        description="Offline multi-teacher distillation for MoVE-KD: pack, extract, cache, train.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (default: one line naming what is wrong)"
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in dict.fromkeys((verbs or VERBS).values()):  # one module may register several verbs
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # verb not available in this build
        mod.add_parser(sub)
    if verbs is None:
        for verb in PASSTHROUGH:  # listed in `movekd --help`; their arguments never reach this parser
            sub.add_parser(verb, help=DESCRIPTIONS[verb], add_help=False)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def prepare_process(verb: str | None) -> None:
    """Once per process, before a verb runs: make torchvision importable for verbs that load
    models (``movekd_compat``); ``movekd cache`` stays free of torch."""
    if verb not in TORCH_FREE_VERBS:
        prepare_torch()


def prepare_torch() -> None:
    """Make torchvision importable (``movekd_compat``) in a torch-free verb that is about to load
    models after all (``movekd cache verify --recompute``); idempotent."""
    from movekd_compat import ensure_torchvision_importable

    ensure_torchvision_importable()


def user_error(prog: str, message: object) -> int:
    """A user's mistake: one line on stderr naming what is wrong, and exit code 2 (no traceback)."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


# What the error boundary reports as a user's mistake (one line, exit 2): the project raises
# ValueError (and its subclasses CacheError, ManifestError, ...) for bad input, configs and data;
# the OS errors are paths that do not exist or cannot be used, and a full disk (a DiskFullError
# from the writer that hit it, or any ENOSPC that escaped one). Anything else is a bug: traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def guarded(prog: str, run, args, debug: bool = False) -> int:
    """Run a verb inside the error boundary: a known user error is one line on stderr and exit
    code 2 (``--debug``: the traceback instead); Ctrl-C is one line and 130."""
    from cache.diskfull import DiskFullError, is_disk_full

    try:
        return int(run(args) or 0)
    except Exception as e:
        if debug or not (isinstance(e, USER_ERRORS) or is_disk_full(e)):
            raise
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            e = DiskFullError(getattr(e, "filename", None) or os.getcwd())
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        return user_error(prog, " ".join(msg.split()) + "  (--debug shows the traceback)")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def run_module(prog: str, description: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """``python -m jobs.VERB``: the verb's own parser and runner, without the ``movekd`` wrapper."""
    prepare_process(prog.rsplit(".", 1)[-1])
    parser = ReadableArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    setup_logging()
    return guarded(prog, run, args, args.debug)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        prepare_process(argv[0])
        return int(importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:]) or 0)
    verbs = None
    # Import only the module of the verb asked for, so `movekd cache` stays light.
    if argv and argv[0] in VERBS:
        verbs = {argv[0]: VERBS[argv[0]]}
    prepare_process(argv[0] if argv and argv[0] in VERBS else None)
    parser = build_parser(verbs)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    return guarded(f"movekd {args.verb}", args.func, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
