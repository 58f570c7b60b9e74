"""The ``movekd cache`` verb: the inspection CLI lives with the format, in ``cache/cli.py``."""

from cache.cli import add_parser

__all__ = ["add_parser"]
