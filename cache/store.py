"""Where a cache lives: a local path or any fsspec URL (``memory://``, ``s3://``, ...).

zarr opens both kinds itself; this module adds the few non-zarr files a cache has (commit
markers, channel statistics) with one rule: a file becomes visible complete or not at all.
Locally that is write-to-temp + ``os.replace`` (atomic on POSIX); on object stores a single PUT
is already atomic, so fsspec's ``pipe`` suffices. Why not zarr's Store API for these files:
its ``set`` is async-only and offers no atomic-rename guarantee for local files.

Claims (``cache.claims``) also need *create-if-absent*: locally a complete temp file hard-linked
to the final name (``link`` fails if the name exists, and the file is never seen half written;
``O_CREAT|O_EXCL`` where hard links are not supported); on object stores fsspec's
``pipe_file(mode="create")`` (a conditional PUT, e.g. S3 ``If-None-Match: *``) where the
filesystem implements it, else a documented best effort (exists, PUT, read back).
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


class Location:
    """A cache root. ``zarr_path`` is what to hand to ``zarr.open_group``."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        if location.startswith("file://"):
            location = location[len("file://") :]
        self.url = location
        self._fs = None
        if is_url(location):
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(location)
        else:
            self._root = str(Path(location).absolute())

    @property
    def zarr_path(self) -> str:
        return self.url if self._fs is not None else self._root

    def _path(self, rel: str) -> str:
        return f"{self._root.rstrip('/')}/{rel}"

    def exists(self, rel: str = "") -> bool:
        path = self._path(rel) if rel else self._root
        return self._fs.exists(path) if self._fs is not None else os.path.exists(path)

    def read_bytes(self, rel: str) -> bytes | None:
        """Contents of ``rel``, or None when it does not exist."""
        try:
            if self._fs is not None:
                return self._fs.cat_file(self._path(rel))
            with open(self._path(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        if self._fs is not None:
            self._fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist; True when this call created it.
        Readers see the whole file or none (never a half-written one)."""
        path = self._path(rel)
        if self._fs is not None:
            return self._create_exclusive_fs(path, data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError as e:  # a filesystem without hard links
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _create_exclusive_fs(self, path: str, data: bytes) -> bool:
        try:
            self._fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):
            pass  # no conditional PUT on this filesystem: best effort (FORMAT.md section 6)
        if self._fs.exists(path):
            return False
        self._fs.pipe_file(path, data)
        return self._fs.cat_file(path) == data

    def remove_if_unchanged(self, rel: str, expected: bytes) -> bool:
        """Delete ``rel`` only if it still holds ``expected``; True when this call removed it.
        Locally the file is first renamed aside (atomic: of two callers only one gets it), then
        checked, and put back if it had changed meanwhile; on object stores a read-compare-delete
        (best effort)."""
        path = self._path(rel)
        if self._fs is not None:
            try:
                if self._fs.cat_file(path) != expected:
                    return False
                self._fs.rm_file(path)
                return True
            except FileNotFoundError:
                return False
        aside = f"{path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            same = f.read() == expected
        if not same:
            try:
                os.link(aside, path)  # put a fresh file back unless someone has created another since
            except FileExistsError:
                pass
        os.unlink(aside)
        return same

    def size(self, rel: str) -> int | None:
        """Byte size of file ``rel``, or None when it does not exist (one stat / HEAD request)."""
        try:
            if self._fs is not None:
                return int(self._fs.size(self._path(rel)))
            return os.path.getsize(self._path(rel))
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        try:
            if self._fs is not None:
                self._fs.rm_file(self._path(rel))
            else:
                os.unlink(self._path(rel))
        except FileNotFoundError:
            pass

    def free_bytes(self) -> int | None:
        """Free bytes on the filesystem holding the root (None for object stores)."""
        from cache.diskfull import free_bytes

        return None if self._fs is not None else free_bytes(self._root)

    def list(self, rel: str) -> list[str]:
        """File names directly under ``rel`` (empty when it does not exist)."""
        path = self._path(rel)
        try:
            if self._fs is not None:
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(path, detail=False))
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def size_on_disk(self) -> int:
        """Total bytes of every file under the root."""
        if self._fs is not None:
            return int(self._fs.du(self._root, total=True))
        total = 0
        for dirpath, _, files in os.walk(self._root):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total

    def __repr__(self) -> str:
        return f"Location({self.url!r})"
