"""One strict dataclass-from-dict for every config and format dataclass of the project.

``from_mapping(cls, data)`` builds a (frozen) dataclass from a JSON/YAML mapping and refuses
anything it does not recognise, naming it: an unknown key (with the valid ones), a missing
required field, a non-mapping, or a value the constructor rejects. A typo in a YAML preset or a
damaged manifest therefore fails at the edge with one line that says what is wrong, never with a
``TypeError`` or ``KeyError`` from deep inside.

Decisions:
- It lives in ``cache/``, the bottom layer, so the manifest, ``TeacherSpec``, ``ExtractConfig``,
  ``TrainConfig``, ``KDConfig`` and ``MoLEConfig`` all share it without breaking the one-way
  import rule (``jobs -> {pipeline, student} -> cache``).
- Nested dataclass fields (``TrainConfig.mole``, ``ExtractConfig.teachers`` as
  ``tuple[TeacherSpec, ...]``, optional ones as ``X | None``) are converted from mappings by the
  field's type hint; a nested class with its own ``from_dict`` is built through it, so its own
  checks and messages apply (e.g. ``TeacherEntry``'s "teacher 'eva': ...").
- The exception type is the caller's (``ManifestError`` for the manifest, ``ValueError`` for
  configs); both are ``ValueError`` subclasses, which is what the CLIs turn into one line + exit 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], data: Any, what: str | None = None, error: type[Exception] = ValueError) -> T:
    """``cls(**data)`` after checking keys, converting nested dataclasses by their type hints."""
    what = what or cls.__name__
    if not isinstance(data, Mapping):
        raise error(f"{what} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise error(f"{what}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if _required(f) and n not in data)
    if missing:
        raise error(f"{what}: missing field(s) {missing}")
    hints = _hints(cls)
    kwargs = {k: _convert(hints.get(k), v, f"{what}.{k}", error) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise error(f"{what}: {e}") from e


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: no nested conversion
        return {}


def _convert(hint: Any, value: Any, what: str, error: type[Exception]) -> Any:
    """``value`` with mappings turned into the dataclass ``hint`` names (also inside
    ``X | None`` and ``tuple[X, ...]``/``list[X]``); anything else is returned unchanged."""
    if hint is None or value is None:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            return value  # already built (or wrong: the constructor's own check reports it)
        own = getattr(hint, "from_dict", None)
        return own(value) if own is not None else from_mapping(hint, value, what, error)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, what, error) if len(inner) == 1 else value
    if origin in (tuple, list) and args and isinstance(value, (list, tuple)):
        item = args[0]
        return origin(_convert(item, v, f"{what}[{i}]", error) for i, v in enumerate(value))
    return value
