"""The teacher registry: families by name, each with a builder and a describer.

``build_teacher(spec, device) -> Teacher`` loads, freezes and probes a teacher;
``describe_teacher(spec) -> TeacherInfo`` tells what a teacher will produce, known without
loading its weights (timm's pretrained-cfg idea): the source it resolves to, the
preprocessing, the tapped layer, the native and stored token grid, the channels and whether it
has a [CLS] row.
``movekd extract --dry-run`` prints a preset's plan, shapes and disk budget from it before any
model loads.

Decisions:
- Each family registers a describer next to its builder (``@register_info("clip")``). Both go
  through the family's one ``*_info(spec, config)`` function, so the metadata and the built
  teacher cannot drift apart; ``build_teacher`` also checks the built teacher against
  ``describe_teacher`` (grid, channels, preprocessing) and fails naming the difference.
- No weights are read. Hugging Face families read the model's ``config.json`` (a local
  directory, or the HF cache); their released default sources (``facebook/sam-vit-large``...)
  carry the needed config fields in the family module, so a preset describes offline. timm
  families build the architecture on PyTorch's ``meta`` device (no memory, no weights) and run
  its real forward on a meta tensor for the output shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cache.codecs import get_codec
from cache.manifest import PreprocessSpec
from pipeline.teachers.base import Teacher, TeacherSpec

_INFO: dict[str, Callable[[TeacherSpec], TeacherInfo]] = {}

_REGISTRY: dict[str, Callable[[TeacherSpec, torch.device], Teacher]] = {}


def register_teacher(name: str) -> Callable:
    """Decorator: register ``builder(spec, device) -> Teacher`` under a family name. Generic
    families register their prefix with a trailing colon (``"hf:"``) and receive every
    ``hf:<argument>`` family."""

    def deco(builder: Callable[[TeacherSpec, torch.device], Teacher]) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"teacher family {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return deco


def list_teachers() -> list[str]:
    return sorted(_REGISTRY)


def split_family(family: str) -> tuple[str, str]:
    """``"hf:facebook/x"`` -> ``("hf:", "facebook/x")``; ``"clip"`` -> ``("clip", "")``; a bare
    generic prefix (``"hf"``) is accepted too, with the argument then taken from ``source``."""
    if ":" in family:
        prefix, arg = family.split(":", 1)
        return prefix + ":", arg
    if family + ":" in _REGISTRY:
        return family + ":", ""
    return family, ""


def build_teacher(spec: TeacherSpec, device: torch.device | str = "cpu") -> Teacher:
    """Load, freeze and probe the teacher ``spec`` names, on ``device``."""
    if not isinstance(spec, TeacherSpec):
        raise ValueError(f"build_teacher needs a TeacherSpec, got {type(spec).__name__}")
    key, _ = split_family(spec.family)
    if key not in _REGISTRY:
        raise ValueError(
            f"teacher {spec.name}: unknown family {spec.family!r}; registered: {list_teachers()} "
            "(generic ones take an argument: 'hf:<path-or-id>', 'timm:<model_name>')"
        )
    teacher = _REGISTRY[key](spec, torch.device(device))
    if key in _INFO:
        check_teacher_matches(teacher, describe_teacher(spec))
    return teacher


@dataclass(frozen=True)
class TeacherInfo:
    """One teacher's outputs as described by its metadata (``grid`` is what the cache stores)."""

    name: str
    family: str
    source: str
    layer: str
    preprocess: PreprocessSpec
    native_grid: tuple[int, int]
    grid: tuple[int, int]
    channels: int
    has_cls: bool = False

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def stored_bytes_per_image(self, codec: str) -> int:
        """Bytes one image's features occupy in ``codec``'s arrays before compression."""
        comps = get_codec(codec).components(self.tokens, self.channels)
        return sum(_prod(c.shape) * _itemsize(c.dtype) for c in comps)


def make_info(
    spec: TeacherSpec,
    preprocess: PreprocessSpec,
    layer: str,
    native_grid: tuple[int, int],
    channels: int,
    has_cls: bool = False,
) -> TeacherInfo:
    """A ``TeacherInfo`` with the spec's resampling applied to the stored grid."""
    native = (int(native_grid[0]), int(native_grid[1]))
    grid = tuple(spec.resample_grid) if spec.resample != "none" else native
    preprocess = dataclasses.replace(preprocess, alpha=spec.alpha)  # as Teacher.__init__ does
    return TeacherInfo(spec.name, spec.family, spec.source, layer, preprocess, native, grid, int(channels), has_cls)


def register_info(name: str) -> Callable:
    """Decorator: register ``describe(spec) -> TeacherInfo`` for a family (as ``register_teacher``)."""

    def deco(fn: Callable[[TeacherSpec], TeacherInfo]) -> Callable:
        if name in _INFO:
            raise ValueError(f"teacher family {name!r} already has a describer")
        _INFO[name] = fn
        return fn

    return deco


def describe_teacher(spec: TeacherSpec) -> TeacherInfo:
    """The metadata of ``spec`` without loading weights (``ValueError`` says what is missing)."""
    key, _ = split_family(spec.family)
    if key not in _INFO:
        raise ValueError(f"teacher {spec.name}: family {spec.family!r} has no describer (known: {sorted(_INFO)})")
    return _INFO[key](spec)


def check_teacher_matches(teacher, info: TeacherInfo) -> None:
    """Refuse a built teacher whose real outputs differ from its metadata (a describer bug)."""
    have = {
        "source": teacher.spec.source,
        "preprocess": teacher.preprocess_spec,
        "native_grid": teacher.native_grid,
        "grid": teacher.grid,
        "channels": teacher.channels,
        "has_cls": teacher.has_cls,
    }
    want = {k: getattr(info, k) for k in have}
    diffs = [f"{k}: model={have[k]!r} metadata={want[k]!r}" for k in have if have[k] != want[k]]
    if diffs:
        raise ValueError(f"teacher {info.name}: its metadata does not match the loaded model: " + "; ".join(diffs))


def info_dict(info: TeacherInfo) -> dict:
    d = dataclasses.asdict(info)
    d["preprocess"] = info.preprocess.to_dict()
    return d


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize
