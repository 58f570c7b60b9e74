"""``movekd lmms-eval ARGS...`` (also ``python -m jobs.lmms_plugin ARGS...``): lmms-eval's own CLI,
run after this project's process set-up.

The arguments go to lmms-eval unchanged (``movekd lmms-eval --help`` prints lmms-eval's help).
Where torchvision's compiled ops load (any CUDA install) the plain ``lmms-eval`` command is the same
thing; on the CPU-only torch pin, lmms-eval's own imports load transformers' image utilities,
which import torchvision before any plugin code could prepare it, so there the harness only starts
through this launcher (``jobs.cli.prepare_process`` runs first, as for every verb).
"""

from __future__ import annotations

import sys

USAGE = 'movekd lmms-eval: lmms-eval is not installed; install the eval extra: pip install -e ".[eval]"'


def main(argv: list[str]) -> int:
    """Run lmms-eval's CLI on ``argv``; the caller (``jobs.cli``) has prepared the process."""
    try:
        from lmms_eval.cli.dispatch import main as lmms_main
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "lmms_eval":
            print(USAGE, file=sys.stderr)
            return 2
        raise
    sys.argv = ["lmms-eval", *argv]
    try:
        lmms_main()
    except SystemExit as e:  # lmms-eval exits with its own code (argparse errors: 2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
