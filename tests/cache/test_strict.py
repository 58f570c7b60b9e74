"""``cache.strict.from_mapping``: the one strict dataclass-from-dict every config uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cache.strict import from_mapping


@dataclass(frozen=True)
class Inner:
    a: int
    b: str = "x"


@dataclass(frozen=True)
class Custom:
    v: int = 0

    @classmethod
    def from_dict(cls, d):
        return cls(v=d["v"] * 10)  # proves the nested class's own from_dict is used


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=lambda: Inner(1))
    maybe: Inner | None = None
    many: tuple[Inner, ...] = ()
    custom: Custom = field(default_factory=Custom)


class MyError(ValueError):
    pass


def test_builds_nested_dataclasses_by_type_hint():
    out = from_mapping(
        Outer,
        {"name": "n", "inner": {"a": 2}, "maybe": {"a": 3, "b": "y"}, "many": [{"a": 4}, {"a": 5}], "custom": {"v": 7}},
    )
    assert out == Outer("n", Inner(2), Inner(3, "y"), (Inner(4), Inner(5)), Custom(70))
    assert from_mapping(Outer, {"name": "n", "maybe": None}).maybe is None
    already = Inner(9)
    assert from_mapping(Outer, {"name": "n", "inner": already}).inner is already


def test_errors_name_the_key_and_use_the_callers_type():
    with pytest.raises(MyError, match=r"outer: unknown field\(s\) \['nmae'\]; valid fields: \[.*'name'"):
        from_mapping(Outer, {"nmae": "n"}, "outer", MyError)
    with pytest.raises(MyError, match=r"outer: missing field\(s\) \['name'\]"):
        from_mapping(Outer, {}, "outer", MyError)
    with pytest.raises(ValueError, match=r"Outer\.inner: unknown field\(s\) \['c'\]"):
        from_mapping(Outer, {"name": "n", "inner": {"a": 1, "c": 2}})
    with pytest.raises(ValueError, match=r"Outer\.many\[1\]: missing field\(s\) \['a'\]"):
        from_mapping(Outer, {"name": "n", "many": [{"a": 1}, {}]})
    with pytest.raises(ValueError, match="Outer must be a mapping, got list"):
        from_mapping(Outer, ["n"])
