"""Check one image file before it is packed: exists, non-empty, decodes, format, colour mode.

Decisions:
- Every unique path is read once, hashed (sha256 of the raw bytes: the packing key) and fully
  decoded: ``Image.verify()`` catches broken structure, ``load()`` catches truncated downloads
  (``verify`` alone passes a JPEG cut in half). Pillow's ``LOAD_TRUNCATED_IMAGES`` must stay off;
  LLaVA's training code turns it on, so this module refuses to run in a process that did.
- A content format that does not match the extension (PNG/GIF under ``.jpg``) and non-RGB modes
  (CMYK, grayscale, palette) are warnings: the file decodes, teachers convert it to RGB, and it is
  packed under its real format's extension.
- Results are cached in an append-only ``_checks.jsonl`` next to the shards, keyed by path, size
  and mtime, so a resumed 665K-scale run does not decode every image again. A torn last line
  (a crash mid-write) is ignored.
- Checks run in a thread pool: hashing and Pillow's decoders release the GIL, and threads need no
  pickling of results. Pillow's per-file warnings (EXIF chatter, large images) are silenced by
  the caller around the whole pool: ``warnings.catch_warnings`` is not thread-safe per call.
- A pixel limit replaces Pillow's anonymous decompression-bomb warning: an image of more than
  ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``, Pillow's own warning threshold, ~9459x9459) is
  rejected as ``too_large`` with its file and size, from the header alone (nothing is decoded).
  A larger limit also raises Pillow's threshold (``allow_pixels``, process-wide and only ever
  upwards), here and in every process that decodes the pack (the index records the limit).
  Pillow's own (anonymous) warning is silenced by the caller around the pool, with the others.
- Animated images (GIF, APNG, WebP) are packed whole but teachers see frame 1: ``animated`` warning.
- Results are cached in ``_checks.jsonl`` whose header records the version and the pixel limit:
  a different limit re-checks every file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass

from PIL import Image, ImageFile

from pipeline.llava_data import PATH_REJECTED, resolve_inside

CHECKS_VERSION = 2
# Pillow's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS as shipped).
DEFAULT_MAX_PIXELS = 89_478_485
MISSING = "missing"
EMPTY = "empty"
UNREADABLE = "unreadable"
FORMAT_MISMATCH = "format_mismatch"
COLOR_MODE = "color_mode"
TOO_LARGE = "too_large"
ANIMATED = "animated"

# Pillow format -> tar member extension (the sample's real format).
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
# file extension -> the Pillow formats it may hold without a warning.
EXT_FORMATS = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".jpe": {"JPEG"},
    ".jfif": {"JPEG"},
    ".png": {"PNG"},
    ".gif": {"GIF"},
    ".webp": {"WEBP"},
    ".bmp": {"BMP"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
}


@dataclass(frozen=True)
class ImageCheck:
    """Outcome for one relative path. ``error`` set means rejected (``category`` says why)."""

    path: str
    sha256: str | None = None
    size: int = 0
    format: str | None = None
    ext: str | None = None
    width: int = 0
    height: int = 0
    mode: str | None = None
    category: str | None = None
    error: str | None = None
    warnings: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = [list(w) for w in self.warnings]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ImageCheck:
        return cls(**{**d, "warnings": tuple(tuple(w) for w in d.get("warnings", ()))})


def allow_pixels(max_pixels: int | None) -> None:
    """Let Pillow open images of up to ``max_pixels`` without its bomb warning (never lowers it).

    Pillow's threshold is process-wide (``Image.MAX_IMAGE_PIXELS``); its hard error is at twice it.
    """
    if max_pixels is None:
        return
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and max_pixels > current:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def check_max_pixels(max_pixels: object) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels (--max-pixels) must be a positive integer, got {max_pixels!r}")
    return max_pixels


def _too_large(path: str, w: int, h: int, max_pixels: int) -> ImageCheck:
    return ImageCheck(
        path,
        width=w,
        height=h,
        category=TOO_LARGE,
        error=f"{w}x{h} = {w * h:,} pixels is over the pixel limit of {max_pixels:,} "
        "(a possible decompression bomb; raise --max-pixels to pack it)",
    )


def _decode(path: str, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # from the header: a bomb is refused before anything is decoded
            if w * h > max_pixels:
                return _too_large(path, w, h, max_pixels)
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode, (w, h) = im.format, im.mode, im.size
            frames = int(getattr(im, "n_frames", 1) or 1)
    except Image.DecompressionBombError as e:  # over twice Pillow's threshold: size from its message
        return ImageCheck(path, category=TOO_LARGE, error=f"over the pixel limit of {max_pixels:,}: {e}")
    except (OSError, ValueError, SyntaxError) as e:
        return ImageCheck(path, category=UNREADABLE, error=f"cannot decode image: {e}")
    found = []
    if frames > 1:
        found.append((ANIMATED, f"animated {fmt} with {frames} frames; teachers see the first frame only"))
    ext = os.path.splitext(path)[1].lower()
    if fmt not in EXT_FORMATS.get(ext, ()):
        found.append((FORMAT_MISMATCH, f"content is {fmt} but the name ends in {ext or '(nothing)'!r}"))
    if mode != "RGB":
        found.append((COLOR_MODE, f"mode {mode}; converted to RGB when a teacher reads it"))
    return ImageCheck(
        path,
        format=fmt,
        ext=FORMAT_EXT.get(fmt, (fmt or "bin").lower()),
        width=w,
        height=h,
        mode=mode,
        warnings=tuple(found),
    )


def check_image(image_root: str, rel: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Run every check on ``image_root/rel``; never raises for a bad file."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ValueError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process: truncated "
            "images would pass. Pack in a process that does not set it."
        )
    try:
        real = resolve_inside(image_root, rel)
    except ValueError as e:
        return ImageCheck(rel, category=PATH_REJECTED, error=str(e))
    if not os.path.exists(real):
        return ImageCheck(rel, category=MISSING, error=f"no such file under the image root: {rel}")
    if not os.path.isfile(real):
        return ImageCheck(rel, category=UNREADABLE, error="not a regular file")
    try:
        with open(real, "rb") as f:
            data = f.read()
    except OSError as e:
        return ImageCheck(rel, category=UNREADABLE, error=f"cannot read: {e}")
    if not data:
        return ImageCheck(rel, category=EMPTY, error="zero-byte file")
    result = _decode(rel, data, max_pixels)
    return dataclasses.replace(result, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _stat_sig(image_root: str, rel: str) -> list[int] | None:
    try:
        st = os.stat(os.path.join(image_root, rel))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class CheckCache:
    """Append-only record of finished checks; an entry counts only if the file's stat matches."""

    def __init__(self, path: str, image_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path, self.root = path, os.path.realpath(image_root)
        self.header = {"version": CHECKS_VERSION, "image_root": self.root, "max_pixels": max_pixels}
        self.entries: dict[str, tuple[list[int], dict]] = {}
        self._load()
        self._file = open(path, "a", encoding="utf-8")
        if not self.entries:
            self._file.truncate(0)
            self._write(self.header)

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            return
        if header != self.header:
            return
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                self.entries[rec["check"]["path"]] = (rec["stat"], rec["check"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn line from an interrupted run

    def _write(self, rec: dict) -> None:
        self._file.write(json.dumps(rec, sort_keys=True) + "\n")

    def get(self, rel: str) -> ImageCheck | None:
        hit = self.entries.get(rel)
        if hit is None or hit[0] != _stat_sig(self.root, rel):
            return None
        return ImageCheck.from_dict(hit[1])

    def put(self, check: ImageCheck) -> None:
        sig = _stat_sig(self.root, check.path)
        if sig is not None and check.category != MISSING:
            self._write({"stat": sig, "check": check.to_dict()})

    def close(self) -> None:
        self._file.close()
