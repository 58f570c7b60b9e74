"""``python -m jobs.lmms_plugin ARGS...`` = ``movekd lmms-eval ARGS...`` (see ``launch``)."""

import sys

from jobs.cli import main

sys.exit(main(["lmms-eval", *sys.argv[1:]]))
