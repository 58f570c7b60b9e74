"""Read LLaVA-format JSON files (LCS-558K, LLaVA-665K) in one streaming pass.

A LLaVA file is a top-level list of ``{"id", "image" (absent for text-only), "conversations"}``
objects (docs/method.md §8). The 665K file is about 1 GB, so this module never holds the text
of the file, nor the parsed rows, more than one row at a time.

Decisions:
- One pass, stdlib only: bytes are read in chunks, hashed (the index records each file's sha256,
  so a trainer can tell the rows it reads are the rows that were packed), decoded incrementally
  and parsed element by element with ``json.JSONDecoder.raw_decode``. No ijson dependency.
- Per row we keep only the id and the normalised image path (paths are interned, so the many
  665K rows that share a COCO image share one string). Conversations are validated and then
  dropped: the trainer re-reads the JSON it trains on (the recorded sha256 ties it to the index),
  which is cheaper than carrying ~1 GB of text through packing.
- A bad row is reported as a ``Problem`` (category, file, row index, id, path, reason) and never
  stops the read. A file that is not a JSON list at all raises ``ValueError``: nothing in it can
  be trusted.
- A row whose ``image`` is a list (LLaVA-OneVision's multi-image rows) is rejected as
  ``multi_image`` with that reason: the student, like LLaVA-1.5, takes one image per row.
- Paths are normalised as posix (``./`` and ``a/../`` collapsed); absolute paths, backslashes and
  anything that escapes the image root after normalisation are rejected here. Symlinks that
  point outside the root can only be seen on disk; ``resolve_inside`` checks that at packing time.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

CHUNK_BYTES = 4 << 20
IMAGE_TOKEN = "<image>"
_WS = re.compile(r"[ \t\r\n]*")

# Problem categories raised while reading rows (packing adds the file-level ones).
INVALID_ROW = "invalid_row"  # rejected: not an object, no id, malformed conversations
PATH_REJECTED = "path_rejected"  # rejected: absolute, escapes the root, symlink outside
MULTI_IMAGE = "multi_image"  # rejected: a list of images (LLaVA-OneVision); not supported yet
IMAGE_TOKEN_COUNT = "image_token"  # warning: kept, but the <image> placeholder count is odd


@dataclass(frozen=True)
class Problem:
    """One reported issue. ``row``/``id`` name the first row that uses ``path``."""

    category: str
    file: str
    row: int
    id: str | None
    path: str | None
    reason: str
    n_rows: int = 1

    def to_dict(self) -> dict:
        return {
            "category": self.category,
            "file": self.file,
            "row": self.row,
            "id": self.id,
            "path": self.path,
            "reason": self.reason,
            "n_rows": self.n_rows,
        }


@dataclass
class LlavaRows:
    """The parts of one LLaVA JSON file that packing needs, one entry per row.

    ``images[i]`` is the normalised relative path of row ``i``, or None for a text-only row or a
    rejected one (``i in rejected``).
    """

    name: str
    path: str
    sha256: str
    ids: list[str | None] = field(default_factory=list)
    images: list[str | None] = field(default_factory=list)
    rejected: set[int] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    def text_only_rows(self) -> list[int]:
        return [i for i, p in enumerate(self.images) if p is None and i not in self.rejected]


def normalize_image_path(raw: object) -> str:
    """Return the posix-normalised relative path, or raise ``ValueError`` saying why not."""
    if not isinstance(raw, str):
        raise ValueError(f"'image' must be a string path, got {type(raw).__name__}")
    if not raw.strip():
        raise ValueError("'image' is an empty path")
    if "\x00" in raw:
        raise ValueError("'image' contains a NUL byte")
    if "\\" in raw:
        raise ValueError(f"'image' {raw!r} contains a backslash; LLaVA paths use '/'")
    if raw.startswith("/"):
        raise ValueError(f"'image' {raw!r} is absolute; paths must be relative to the image root")
    norm = posixpath.normpath(raw)
    if norm in (".", "") or norm == ".." or norm.startswith("../"):
        raise ValueError(f"'image' {raw!r} escapes the image root after normalisation ({norm!r})")
    return norm


def resolve_inside(root: str, rel: str) -> str:
    """Absolute real path of ``root/rel``; ``ValueError`` if symlinks lead outside ``root``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"{rel!r} resolves to {real!r}, outside the image root {real_root!r}")
    return real


def _check_conversations(conv: object) -> int:
    """Validate the conversation list; return how many ``<image>`` placeholders it holds."""
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' must be a non-empty list")
    count = 0
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{t}] must be an object, got {type(turn).__name__}")
        if not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{t}] needs string 'from' and 'value'")
        count += turn["value"].count(IMAGE_TOKEN)
    return count


def _row_id(row: dict) -> str:
    rid = row.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError(f"'id' must be a string (or int), got {rid!r}")
    return str(rid)


def iter_json_list(path: str, hasher=None) -> Iterator[object]:
    """Yield the elements of a top-level JSON list, reading the file in chunks.

    ``hasher`` (e.g. ``hashlib.sha256()``) is updated with every byte of the file.
    """
    reader = _ChunkReader(path, hasher)
    decoder = json.JSONDecoder()
    try:
        if reader.next_char() != "[":
            raise ValueError(f"{path}: a LLaVA file must be a JSON list of rows")
        reader.pos += 1
        count, after_value = 0, False
        while True:
            c = reader.next_char()
            where = f"{path}: after row {count - 1}" if count else f"{path}: at the first row"
            if c == "":
                raise ValueError(f"{where}: unexpected end of file inside the top-level list")
            if c == "]" and (after_value or count == 0):
                break
            if after_value != (c in ",]"):
                raise ValueError(
                    f"{where}: expected {'a comma' if after_value else 'a row'}, "
                    f"found {c!r} at character {reader.offset + reader.pos}"
                )
            if c == ",":
                reader.pos, after_value = reader.pos + 1, False
                continue
            try:
                obj, end = decoder.raw_decode(reader.buf, reader.pos)
            except json.JSONDecodeError as e:
                if reader.more():
                    continue
                raise ValueError(f"{where}: invalid JSON at character {reader.offset + e.pos}: {e.msg}") from e
            if end >= len(reader.buf) and reader.more():  # a number may go on in the next chunk
                continue
            reader.pos, after_value, count = end, True, count + 1
            yield obj
        reader.pos += 1
        if reader.next_char() != "":
            raise ValueError(f"{path}: unexpected data after the top-level list")
    finally:
        reader.close()


class _ChunkReader:
    """Incrementally decoded text of a file, hashed as it is read; ``buf[pos:]`` is unread."""

    def __init__(self, path: str, hasher) -> None:
        self.path, self.hasher = path, hasher
        self.file = open(path, "rb")
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof, self.offset = "", 0, False, 0

    def more(self) -> bool:
        """Append the next chunk; False at end of file."""
        if self.eof:
            return False
        data = self.file.read(CHUNK_BYTES)
        if self.hasher is not None:
            self.hasher.update(data)
        try:
            text = self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text ({e})") from e
        self.offset += self.pos  # characters dropped from the front of buf so far
        self.buf, self.pos, self.eof = self.buf[self.pos :] + text, 0, not data
        return bool(data)

    def next_char(self) -> str:
        """Skip whitespace; return the next character, '' at end of file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def close(self) -> None:
        self.file.close()


def _parse_row(rows: LlavaRows, index: int, row: object, intern: dict[str, str]) -> None:
    rid: str | None = None
    raw = row.get("image") if isinstance(row, dict) else None
    try:
        if not isinstance(row, dict):
            raise ValueError(f"a row must be an object, got {type(row).__name__}")
        rid = _row_id(row)
        n_tokens = _check_conversations(row.get("conversations"))
    except ValueError as e:
        rows.ids.append(rid)
        rows.images.append(None)
        rows.rejected.add(index)
        rows.problems.append(Problem(INVALID_ROW, rows.name, index, rid, _str_or_none(raw), str(e)))
        return
    rows.ids.append(rid)
    image = None
    if isinstance(raw, list):
        rows.rejected.add(index)
        first = next((p for p in raw if isinstance(p, str)), None)
        reason = (
            f"multi-image rows are not supported yet: 'image' is a list of {len(raw)} images "
            "(LLaVA-OneVision style); the row is skipped. Split it into single-image rows to train on it"
        )
        rows.problems.append(Problem(MULTI_IMAGE, rows.name, index, rid, first, reason))
    elif "image" in row:
        try:
            norm = normalize_image_path(raw)
            image = intern.setdefault(norm, norm)
        except ValueError as e:
            rows.rejected.add(index)
            rows.problems.append(Problem(PATH_REJECTED, rows.name, index, rid, _str_or_none(raw), str(e)))
    rows.images.append(image)
    want = 1 if image is not None else 0
    if index not in rows.rejected and n_tokens != want:
        what = "image row" if image is not None else "text-only row"
        rows.problems.append(
            Problem(
                IMAGE_TOKEN_COUNT,
                rows.name,
                index,
                rid,
                image,
                f"{what} has {n_tokens} {IMAGE_TOKEN} placeholders, expected {want}",
            )
        )


def _str_or_none(raw: object) -> str | None:
    return raw if isinstance(raw, str) else (None if raw is None else repr(raw))


def read_llava_json(path: str, name: str | None = None, intern: dict[str, str] | None = None) -> LlavaRows:
    """Parse one LLaVA JSON file in a single streaming pass.

    ``name`` identifies the file in the index (default: its base name). ``intern`` is shared
    across files so that one path is one string object however many rows use it.
    """
    hasher = hashlib.sha256()
    rows = LlavaRows(name=name or os.path.basename(path), path=os.path.abspath(path), sha256="")
    intern = {} if intern is None else intern
    for index, row in enumerate(iter_json_list(path, hasher)):
        _parse_row(rows, index, row, intern)
    rows.sha256 = hasher.hexdigest()
    return rows
