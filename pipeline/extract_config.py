"""``ExtractConfig``: everything an extraction run needs, built in one place.

Named presets are YAML files in ``jobs/configs/``; a file may name a ``base`` preset (resolved
relative to itself, then to ``jobs/configs``) and override fields, so a variant changes one field.
``--set key=value`` overrides on the command line use the same merge. Library code never reads
``sys.argv`` or the environment: the CLI parses into this dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cache.codecs import get_codec
from pipeline.teachers import TeacherSpec

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run: packed input -> cache.

    ``codec`` applies to every teacher unless ``codecs`` names one for it. ``aspect`` (``square``
    or ``pad``), when set, overrides every teacher's LLaVA aspect mode. ``num_workers`` actors are
    started, each with ``gpus_per_worker`` GPUs (``device: cuda``) or ``cpus_per_worker`` CPUs.
    """

    packed: str
    out: str
    teachers: tuple[TeacherSpec, ...]
    codec: str = "int8"
    codecs: Mapping[str, str] = field(default_factory=dict)
    cls_teacher: str | None = "clip"
    aspect: str | None = None
    dataset_name: str = ""
    batch_size: int = 8
    device: str = "auto"
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    decode_threads: int = 4
    prefetch_batches: int = 2
    max_shard_retries: int = 2
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    report: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        teachers = tuple(t if isinstance(t, TeacherSpec) else TeacherSpec.from_dict(t) for t in self.teachers)
        if self.aspect is not None:
            if self.aspect not in ("square", "pad"):
                raise ValueError(f"aspect must be 'square' or 'pad', got {self.aspect!r}")
            teachers = tuple(dataclasses.replace(t, aspect=self.aspect) for t in teachers)
        object.__setattr__(self, "teachers", teachers)
        object.__setattr__(self, "codecs", dict(self.codecs))
        names = [t.name for t in teachers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"teachers must be a non-empty list of unique names, got {names}")
        unknown = sorted(set(self.codecs) - set(names))
        if unknown:
            raise ValueError(f"codecs names teacher(s) {unknown} that are not in teachers {names}")
        for name in names:
            get_codec(self.codec_for(name))  # fails early on unknown codec names
        if self.cls_teacher is not None and self.cls_teacher not in names:
            raise ValueError(f"cls_teacher {self.cls_teacher!r} is not among the teachers {names}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for k in ("batch_size", "num_workers", "decode_threads", "prefetch_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    def codec_for(self, teacher: str) -> str:
        return self.codecs.get(teacher, self.codec)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teachers"] = [t.to_dict() for t in self.teachers]
        d["codecs"] = dict(self.codecs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExtractConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown extraction config key(s) {unknown}; valid keys: {sorted(names)}")
        missing = sorted(k for k in ("packed", "out", "teachers") if d.get(k) in (None, "", []))
        if missing:
            raise ValueError(f"extraction config is missing {missing} (set them in the YAML or with --set KEY=VALUE)")
        return cls(**d)


def load_yaml_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML preset, resolving ``base:`` chains, then apply dotted ``overrides``."""
    data = _load_with_base(_resolve(path), seen=())
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (so numbers, lists and null work)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _resolve(path: str | Path, relative_to: Path | None = None) -> Path:
    p = Path(path)
    candidates = (
        [p]
        if p.is_absolute()
        else [*([relative_to / p] if relative_to else []), p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    )
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"config {str(path)!r} not found (looked in {[str(c) for c in candidates]})")


def _load_with_base(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise ValueError(f"config base chain loops: {' -> '.join(map(str, seen + (path,)))}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _load_with_base(_resolve(base, path.parent), seen + (path,))
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
