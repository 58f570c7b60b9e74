"""``python -m cache ...``: the cache inspection CLI (see cache/cli.py)."""

import sys

from cache.cli import main

if __name__ == "__main__":
    sys.exit(main())
