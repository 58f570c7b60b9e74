"""The cache manifest: everything that determines a cache's contents, as frozen dataclasses.

Decisions:
- The manifest lives in the root group's attributes under ``"movekd"`` (inside ``zarr.json``), so a
  plain zarr reader sees it, and it is written once, when the cache is created.
- ``identity()`` is the part that must match to resume writing into a cache; ``created`` and
  ``package_version`` are recorded but are not identity (a resumed job may run a patch release).
- Validation happens here, at the edge: ``from_dict`` rejects unknown format versions and
  malformed fields with a message that says what to do, never a KeyError from deep inside.
- Format 2 added ``null_input`` (what the no-image row holds: ``black``, the released input) and
  ``preprocess.alpha`` (``drop``, as PIL's ``convert('RGB')``, or ``white``). Format 1 caches stay
  readable (inspect, verify, show): they are read as ``null_input="zeros"`` and
  ``alpha="white"``, which is what that code wrote; the trainer refuses ``zeros`` (student/data.py).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cache.strict import from_mapping

FORMAT_NAME = "movekd-feature-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the no-image row holds zeros, alpha composited on white
ATTRS_KEY = "movekd"

RESIZE_MODES = ("shortest_edge", "longest_edge", "none")
CROP_MODES = ("center", "none")
PAD_MODES = ("none", "bottom_right")
ASPECT_MODES = ("square", "pad")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")
RESAMPLE_MODES = ("none", "area", "bilinear")
ALPHA_MODES = ("drop", "white")
# What the reserved no-image row holds: ``black`` = a black image through each teacher's own
# preprocessing (the released input, -mean/std after normalisation); ``zeros`` = all-zero
# normalised pixels (format 1 caches; refused for training).
NULL_INPUTS = ("black", "zeros")
NULL_INPUT = "black"


class ManifestError(ValueError):
    """A manifest that cannot be read or does not match what the caller expects."""


class ManifestMismatchError(ManifestError):
    """Two manifests that must be identical differ; ``fields`` lists the dotted paths that differ."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestError(msg)


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    _require(value in allowed, f"{what} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the tensor a teacher saw (docs/method.md §3).

    ``aspect`` is LLaVA's ``image_aspect_ratio``: ``square`` feeds the image as is (the processor
    then resizes/crops); ``pad`` first expands it to a square filled with the mean colour.
    ``alpha``: ``drop`` discards transparency as PIL's ``convert('RGB')`` does (the released
    loader); ``white`` composites onto white (Hugging Face's processors).
    """

    resolution: int
    resize: str = "shortest_edge"
    crop: str = "center"
    pad: str = "none"
    aspect: str = "square"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    alpha: str = "drop"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        _require(int(self.resolution) > 0, f"preprocess.resolution must be > 0, got {self.resolution}")
        _choice(self.resize, RESIZE_MODES, "preprocess.resize")
        _choice(self.crop, CROP_MODES, "preprocess.crop")
        _choice(self.pad, PAD_MODES, "preprocess.pad")
        _choice(self.aspect, ASPECT_MODES, "preprocess.aspect")
        _choice(self.interpolation, INTERPOLATIONS, "preprocess.interpolation")
        _choice(self.alpha, ALPHA_MODES, "preprocess.alpha")
        _require(len(self.mean) == 3 and len(self.std) == 3, "preprocess.mean/std need 3 values")
        _require(all(s > 0 for s in self.std), "preprocess.std values must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        return from_mapping(cls, d, "preprocess", ManifestError)


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher as stored: where it came from, what was tapped, the token layout, the codec.

    ``tokens == grid[0] * grid[1]`` always holds: features are stored as tokens in row-major grid
    order. ``resample`` != "none" means the teacher's native grid was resized to ``grid`` at
    extraction time (``native_grid`` keeps the original).
    """

    name: str
    family: str
    source: str
    weights_fingerprint: str
    layer: str
    tokens: int
    grid: tuple[int, int]
    channels: int
    compute_dtype: str
    preprocess: PreprocessSpec
    codec: str
    resample: str = "none"
    native_grid: tuple[int, int] | None = None
    has_cls: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        if self.native_grid is not None:
            object.__setattr__(self, "native_grid", tuple(int(v) for v in self.native_grid))
        _require(bool(self.name) and "/" not in self.name, f"teacher name {self.name!r} must be non-empty, no '/'")
        _require(len(self.grid) == 2, f"teacher {self.name}: grid must be (rows, cols), got {self.grid}")
        _require(
            self.tokens == self.grid[0] * self.grid[1],
            f"teacher {self.name}: tokens={self.tokens} but grid {self.grid} has {self.grid[0] * self.grid[1]}",
        )
        _require(self.channels > 0, f"teacher {self.name}: channels must be > 0")
        _choice(self.resample, RESAMPLE_MODES, f"teacher {self.name}: resample")
        if not isinstance(self.preprocess, PreprocessSpec):
            raise ManifestError(f"teacher {self.name}: preprocess must be a PreprocessSpec")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        d["native_grid"] = list(self.native_grid) if self.native_grid is not None else None
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherEntry:
        name = d.get("name") if isinstance(d, Mapping) else None
        return from_mapping(cls, d, f"teacher {name!r}", ManifestError)


@dataclass(frozen=True)
class CacheManifest:
    """What produced a cache. ``num_shards`` data shards of ``shard_size`` rows, plus one reserved
    row (the "no image" input, described by ``null_input``) at row ``num_shards * shard_size``."""

    teachers: tuple[TeacherEntry, ...]
    num_shards: int
    shard_size: int
    dataset_fingerprint: str
    dataset_name: str = ""
    cls_teacher: str | None = None
    package_version: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION
    null_input: str = NULL_INPUT
    notes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "teachers", tuple(self.teachers))
        _require(len(self.teachers) > 0, "a cache needs at least one teacher")
        names = [t.name for t in self.teachers]
        _require(len(set(names)) == len(names), f"teacher names must be unique, got {names}")
        _require(self.num_shards > 0, f"num_shards must be > 0, got {self.num_shards}")
        _require(self.shard_size > 0, f"shard_size must be > 0, got {self.shard_size}")
        _choice(self.null_input, NULL_INPUTS, "null_input")
        _require(self.format_version in READABLE_VERSIONS, f"format_version must be one of {READABLE_VERSIONS}")
        _require(
            self.format_version >= 2 or self.null_input == "zeros",
            "a format 1 manifest always describes a zeros no-image row",
        )
        if self.cls_teacher is not None:
            _require(self.cls_teacher in names, f"cls_teacher {self.cls_teacher!r} is not a teacher ({names})")
        if not self.created:
            object.__setattr__(self, "created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if not self.package_version:
            object.__setattr__(self, "package_version", _package_version())

    # -- layout helpers ------------------------------------------------------------------
    @property
    def null_row(self) -> int:
        """Row index of the reserved "no image" entry."""
        return self.num_shards * self.shard_size

    @property
    def num_rows(self) -> int:
        return self.null_row + 1

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """[start, stop) rows of data shard ``shard``; ``num_shards`` is the reserved shard."""
        if not 0 <= shard <= self.num_shards:
            raise IndexError(f"shard {shard} outside 0..{self.num_shards}")
        start = shard * self.shard_size
        return start, (start + self.shard_size if shard < self.num_shards else start + 1)

    def teacher(self, name: str) -> TeacherEntry:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(f"teacher {name!r} is not in this cache (it has {[t.name for t in self.teachers]})")

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.teachers)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "null_input": self.null_input,
            "teachers": [t.to_dict() for t in self.teachers],
            "num_shards": self.num_shards,
            "shard_size": self.shard_size,
            "dataset_fingerprint": self.dataset_fingerprint,
            "dataset_name": self.dataset_name,
            "cls_teacher": self.cls_teacher,
            "package_version": self.package_version,
            "created": self.created,
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheManifest:
        if not isinstance(d, Mapping):
            raise ManifestError("the manifest must be a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise ManifestError(f"not a movekd cache manifest (format={d.get('format')!r}, expected {FORMAT_NAME!r})")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ManifestError(
                f"cache format version {version!r} is not supported by this movekd "
                f"(supports {', '.join(map(str, READABLE_VERSIONS))}); "
                + (
                    "upgrade movekd to read it"
                    if isinstance(version, int) and version > FORMAT_VERSION
                    else "re-extract the cache with this movekd"
                )
            )
        d = {k: v for k, v in d.items() if k != "format"}
        _require(isinstance(d.get("teachers"), list), "manifest 'teachers' must be a list")
        if version == 1:
            d = _from_format_1(d)
        return from_mapping(cls, d, "manifest", ManifestError)

    def with_black_null_input(self) -> CacheManifest:
        """This manifest at the current format with ``null_input="black"`` (every other field,
        the teachers' ``alpha`` included, kept): what a cache becomes once its no-image row has
        been rewritten (``pipeline.extract_null``)."""
        return dataclasses.replace(self, format_version=FORMAT_VERSION, null_input="black")

    # -- identity ------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The fields that determine the contents (everything except provenance)."""
        d = self.to_dict()
        for k in ("created", "package_version", "notes"):
            d.pop(k)
        return d

    def check_same(self, other: CacheManifest, what: str = "cache") -> None:
        """Raise ManifestMismatchError naming every field where ``other`` differs from ``self``."""
        diffs = diff_dicts(self.identity(), other.identity())
        if diffs:
            lines = [f"  {path}: existing={a!r} requested={b!r}" for path, a, b in diffs[:12]]
            more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
            if any(p in ("format_version", "null_input") for p, _, _ in diffs):
                more += (
                    "\nIf only format_version, null_input and preprocess.alpha differ, the cache was written "
                    "by an older movekd: rewrite just its no-image row with `movekd extract --config CONFIG "
                    "--rewrite-null-row` (cache/FORMAT.md section 2)."
                )
            raise ManifestMismatchError(
                f"the existing {what} was written with a different configuration; "
                f"{len(diffs)} field(s) differ:\n"
                + "\n".join(lines)
                + more
                + "\nWrite to a new cache path, or restore the configuration that produced this one.",
                [p for p, _, _ in diffs],
            )


def _from_format_1(d: dict[str, Any]) -> dict[str, Any]:
    """A format 1 manifest as format 2 fields: the code that wrote it stored all-zero normalised
    pixels in the no-image row and composited alpha onto white."""
    _require("null_input" not in d, "a format 1 manifest has no 'null_input' field")
    teachers = []
    for t in d["teachers"]:
        pre = t.get("preprocess") if isinstance(t, Mapping) else None
        if isinstance(pre, Mapping):
            _require("alpha" not in pre, "a format 1 manifest has no 'preprocess.alpha' field")
            t = {**t, "preprocess": {**pre, "alpha": "white"}}
        teachers.append(t)
    return {**d, "teachers": teachers, "null_input": "zeros"}


def diff_dicts(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted paths where two JSON-like values differ (teachers are matched by name)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff_dicts(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if a and b and all(isinstance(x, Mapping) and "name" in x for x in a + b):
            return diff_dicts({x["name"]: x for x in a}, {x["name"]: x for x in b}, path)
        if len(a) != len(b):
            return [(path, a, b)]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff_dicts(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [(path, a, b)]


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("movekd")
    except Exception:  # noqa: BLE001 - running from a source tree without install metadata
        return "0+unknown"
