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
- Scalars are checked against the field's declared type (``int``, ``float``, ``bool``, ``str``,
  also inside ``X | None``, ``tuple[X, ...]``, ``list[X]``, ``Literal[...]``) and coerced where the
  meaning is unambiguous: an int for a float field, and a string that spells a number or a boolean
  (YAML 1.1 reads ``2e-5`` as a string, so ``--set lr=2e-5`` and ``lr: 2e-5`` in a preset would
  otherwise reach the trainer as text). Anything else is an error naming the key, the value and
  the expected type; a bool is never taken for a number.
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
    for k, v in kwargs.items():  # null for a field that takes no None: "not set", i.e. its default
        if v is None and not _allows_none(hints.get(k)) and not _required(fields[k]):
            f = fields[k]
            kwargs[k] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kwargs = {k: _typed(hints.get(k), v, f"{what}.{k}", error) for k, v in kwargs.items()}
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


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _allows_none(hint: Any) -> bool:
    if hint is None or hint is Any:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _typed(hint: Any, value: Any, what: str, error: type[Exception]) -> Any:
    """``value`` checked against (and, where unambiguous, coerced to) the scalar type ``hint``."""
    if hint is None or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _typed(inner[0], value, what, error) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise error(f"{what}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        return origin(_typed(item, v, f"{what}[{i}]", error) for i, v in enumerate(value))
    if hint not in (int, float, bool, str):
        return value  # dataclasses (converted above), mappings, unions of several types: their own checks
    return _scalar(hint, value, what, error)


def _scalar(hint: type, value: Any, what: str, error: type[Exception]) -> Any:
    bad = error(f"{what}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if isinstance(value, bool):
        raise bad  # True is an int in Python, never a number here
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise bad from None
    raise bad
