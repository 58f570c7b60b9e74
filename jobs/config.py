"""Named configs: YAML presets in ``jobs/configs/`` -> ``ExtractConfig`` / ``TrainConfig``.

One mechanism for every run the project starts (CLI, demo, online-teacher mode, tests, benchmarks):

    cfg = load_config("movekd_v1_0_pretrain", {"packed": "/data/p", "out": "/data/c"})

Decisions:
- A preset is a YAML mapping. ``kind: extract`` or ``kind: train`` says which dataclass it builds
  (a preset handed to the wrong command is refused, naming the right one). ``base:`` names
  another preset (resolved relative to the file, then in ``jobs/configs``); the file's keys are
  deep-merged over it, so a variant states only what it changes. Each recipe value is written
  once: the stage-1 (pretrain) recipe is ``TrainConfig``'s defaults, the stage-2 recipe lives only
  in ``train_v1_0_finetune.yaml``.
- Overrides (``--set key=value``) are dotted paths (``teachers.1.resolution``, ``mole.rank``)
  with YAML-parsed values, applied after the base chain.
- Blocks that create things are expanded here, before validation: ``tiny_teachers: {dir,
  families}`` writes tiny random-weight teachers and puts their specs in ``teachers``;
  ``tiny_student: {dir}`` writes a tiny CLIP/LLM/tokenizer and points the paths at them. That is
  how the bundled sample runs offline.
- Library code never reads YAML, ``sys.argv`` or the environment: only this module and the CLIs do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("extract", "train")
# What a bad preset, key or override raises: the CLIs turn these into one line and exit code 2.
CONFIG_ERRORS = (ValueError, FileNotFoundError)
_COMMAND = {"extract": "movekd extract", "train": "movekd train"}


def list_presets() -> dict[str, str]:
    """Every shipped preset name -> its kind (``extract`` / ``train``)."""
    return {p.stem: read_preset(p)[0] for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, kind: str | None = None):
    """Resolve a preset (name or file) with ``overrides`` into its config dataclass.

    ``kind`` (``extract``/``train``), when given, must match the preset's own ``kind:`` (a file
    without one is taken as that kind). Raises ``ValueError`` / ``FileNotFoundError`` with a
    message that names the key or file.
    """
    found, data = read_preset(path, overrides, default_kind=kind)
    if kind is not None and found != kind:
        article = "an" if found[0] in "aeiou" else "a"
        raise ValueError(f"config {str(path)!r} is {article} {found} preset; run it with `{_COMMAND[found]}`")
    if found == "extract":
        from pipeline.extract_config import ExtractConfig

        return ExtractConfig.from_dict(expand_tiny_teachers(data))
    from student.config import TrainConfig

    return TrainConfig.from_dict(expand_tiny_student(data))


def read_preset(
    path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, default_kind: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(kind, merged mapping) of a preset after its ``base:`` chain and ``overrides``."""
    data = _load_with_base(_resolve(path), seen=())
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    kind = data.pop("kind", default_kind)
    if kind not in KINDS:
        raise ValueError(f"config {str(path)!r}: 'kind' must be one of {KINDS} (in the file or its base), got {kind!r}")
    return kind, data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (so numbers, lists and null work)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def parse_overrides(texts: list[str], **shortcuts: Any) -> dict[str, Any]:
    """``--set`` strings plus CLI shortcuts (``packed=args.packed`` ...; None = not given)."""
    out = dict(parse_override(t) for t in texts)
    out.update({k: v for k, v in shortcuts.items() if v is not None})
    return out


# -- blocks that create things -------------------------------------------------------------------
def expand_tiny_teachers(data: dict[str, Any]) -> dict[str, Any]:
    """Replace a ``tiny_teachers`` block by the specs of freshly made (or existing) tiny models."""
    tiny = data.pop("tiny_teachers", None)
    if tiny is None:
        return data
    from pipeline.teachers.tiny import make_tiny_teachers

    if not isinstance(tiny, Mapping) or "dir" not in tiny:
        raise ValueError("tiny_teachers needs a mapping with 'dir' (and optionally 'families')")
    specs = make_tiny_teachers(tiny["dir"], families=tiny.get("families"))
    data["teachers"] = [s.to_dict() for s in specs]
    return data


def expand_tiny_student(data: dict[str, Any]) -> dict[str, Any]:
    """Replace a ``tiny_student`` block by the paths of freshly made (or existing) tiny models."""
    tiny = data.pop("tiny_student", None)
    if tiny is None:
        return data
    from student.tiny import make_tiny_llava_parts

    if not isinstance(tiny, Mapping) or "dir" not in tiny:
        raise ValueError("tiny_student needs a mapping with 'dir'")
    root = tiny["dir"]
    if not os.path.isfile(os.path.join(root, "llm", "config.json")):
        make_tiny_llava_parts(root)
    data.update(
        vision_tower=os.path.join(root, "vision"),
        llm=os.path.join(root, "llm"),
        tokenizer=os.path.join(root, "tokenizer"),
    )
    return data


# -- YAML ---------------------------------------------------------------------------------------
def _resolve(path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    p = Path(path)
    if p.is_absolute():
        candidates = [p]
    else:
        near = [relative_to / p] if relative_to else []
        candidates = [*near, p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"config {str(path)!r} not found (looked in {[str(c) for c in candidates]}); "
        f"shipped presets: {sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))}"
    )


def _load_with_base(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise ValueError(f"config base chain loops: {' -> '.join(map(str, seen + (path,)))}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
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
    try:
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    except (IndexError, ValueError, TypeError, AttributeError):
        raise ValueError(f"override {key!r}: that path does not exist in the config") from None
