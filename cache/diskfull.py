"""A full disk as one line: which path could not be written and how much space is left there.

Every writer of the project (cache shards and markers, packed shards, checkpoints, reports) turns
an ``ENOSPC``/``EDQUOT`` into ``DiskFullError`` with the path it was writing; the CLI's error
boundary (``jobs.cli.guarded``) prints it as one line and exits non-zero, and long jobs stop at
the first one (the next write would fail the same way) after keeping what was committed.

Decisions:
- The free space comes from ``shutil.disk_usage`` of the nearest existing folder of the path,
  measured when the error is raised (what the operator needs to compare with the job's budget).
- Writers that bypass Python's file objects report a full disk in their own words: torch's zip
  writer says ``unexpected pos`` or ``file write failed`` (``PytorchStreamWriter``), safetensors
  says ``No space left on device`` inside its own error. ``is_disk_full`` knows these texts, so
  each call site only wraps its writes in ``disk_full_as_error(path)``.
- ``DiskFullError`` is an ``OSError`` with ``errno.ENOSPC`` (code that already handles OSError
  keeps working) that pickles by its fields, so it crosses a Ray actor boundary intact.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# What writers that do not raise OSError say when the disk is full (torch's PytorchStreamWriter,
# safetensors and zarr's async writers that re-raise as text).
DISK_FULL_TEXTS = (
    "unexpected pos",
    "file write failed",
    "No space left on device",
    "os error 28",
    "Disk quota exceeded",
)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing folder); None if unknown."""
    p = os.path.abspath(os.fspath(path))
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class DiskFullError(OSError):
    """The disk (or quota) holding ``path`` is full."""

    def __init__(self, path: str | os.PathLike, free: int | None = None, detail: str = ""):
        path = os.fspath(path)
        self.path, self.detail = path, detail
        self.free = free_bytes(path) if free is None and "://" not in path else free
        super().__init__(errno.ENOSPC, self.message, path)

    @property
    def message(self) -> str:
        where = "on that filesystem" if "://" not in self.path else "(object store: free space unknown)"
        return (
            f"disk full: cannot write {self.path} ({format_bytes(self.free)} free {where}); free some space "
            f"or use another location, then rerun the same command (what was committed is kept)"
        )

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.path, self.free, self.detail))


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in DISK_FULL_TEXTS):  # e.g. safetensors' SafetensorError, torch's RuntimeError
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing under ``path`` into ``DiskFullError(path)``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(path, detail=f"{type(e).__name__}: {str(e)[:200]}") from e
        raise
