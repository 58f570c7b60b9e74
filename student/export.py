"""Export a trained student and load it back with one call (``load_pretrained(dir)``).

Layout of an export directory::

    movekd_student.json   format/version, MoLE config, projector kind, adapter specs, teachers,
                          the CLIP-teacher name, vision layer, KD config (the default for reuse)
    vision/               the CLIP tower's base weights, HF ``save_pretrained`` (config.json +
                          safetensors; MoLE's fc1/fc2 keep HF's key names)
    llm/                  the causal LM, HF ``save_pretrained``
    student.safetensors   what HF does not know: MoLE routers/experts, projector, adapters
    tokenizer/            optional

Decisions:
- HF's own ``save_pretrained``/``from_pretrained`` carry the two big pretrained parts: they handle
  tied weights, sharding, dtype and attention-kernel choice, and ``vision/``/``llm/`` stay loadable
  by plain transformers. Only the new modules go in our safetensors file, keyed by their
  ``DistillModel`` parameter names and loaded strictly (missing/extra keys are errors).
- ``inference`` in ``movekd_student.json`` (optional) holds the training template and the student's
  ``PreprocessSpec`` (stage aspect), so generation feeds the model as it was trained.
- Written into ``<dir>.tmp`` and renamed into place, so a crash never leaves a half export.
- Stage 2 starts from a stage-1 export via ``TrainConfig.init_from``; ``check_compatible`` refuses
  a config whose MoLE/projector/adapter shapes differ from the export's, naming the fields.
- FSDP-sharded models are not exported directly: load the final (full-state) checkpoint into an
  unsharded model on one rank (``student.checkpoint.load_weights``) and export that.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cache.manifest import diff_dicts
from student.adapters import MLPAdapter, TokenLinearAdapter
from student.distill_model import DistillModel
from student.kd_loss import KDConfig
from student.llava import LlavaStudent, build_llava
from student.mole import MoLEConfig, add_mole
from student.trainable import new_module_parameter_names

FORMAT, FORMAT_VERSION = "movekd-student", 1
META, WEIGHTS = "movekd_student.json", "student.safetensors"
_MOLE_KEYS = (".router.", ".lora_fc1.", ".lora_fc2.")


def adapter_spec(adapter: nn.Module) -> dict:
    kinds = {TokenLinearAdapter: "token_linear", MLPAdapter: "mlp"}
    kind = kinds.get(type(adapter))
    if kind is None:
        raise ValueError(f"cannot export adapter of type {type(adapter).__name__}")
    first = adapter.channel_proj if kind == "token_linear" else adapter.fc1
    out_tokens = adapter.token_proj.out_features if kind == "token_linear" else adapter.tokens
    spec = {
        "kind": kind,
        "channels": adapter.channels,
        "tokens": adapter.tokens,
        "student_dim": first.out_features,
        "student_tokens": out_tokens,
    }
    if kind == "token_linear":
        spec["layout"], spec["grid"] = adapter.layout, list(adapter.grid) if adapter.grid else None
    return spec


def adapter_from_spec(spec: dict) -> nn.Module:
    cls = {"token_linear": TokenLinearAdapter, "mlp": MLPAdapter}.get(spec.get("kind"))
    if cls is None:
        raise ValueError(f"unknown adapter kind in export: {spec.get('kind')!r}")
    args = (spec["channels"], spec["tokens"], spec["student_dim"], spec["student_tokens"])
    if cls is TokenLinearAdapter:  # exports older than the layout field are row-major
        return cls(*args, layout=spec.get("layout", "row_major"), grid=spec.get("grid"))
    return cls(*args)


def _metadata(model: DistillModel) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mole": model.mole_config.to_dict(),
        "kd": model.kd_config.to_dict(),
        "projector": model.llava.projector.kind,
        "vision_layer": model.llava.vision_layer,
        "num_prefix_tokens": model.llava.num_prefix_tokens,
        "teachers": list(model.teachers),
        "clip_name": model.clip_name,
        "adapters": {name: adapter_spec(a) for name, a in model.adapters.items()},
    }


def export_pretrained(model: DistillModel, out_dir, tokenizer=None, inference: dict | None = None) -> Path:
    """Write ``model`` (unsharded) to ``out_dir`` atomically; returns the directory.

    ``inference`` (``{"template": ..., "preprocess": PreprocessSpec.to_dict()}``) records how the
    model was trained to be prompted and fed, for ``student.generate`` / ``movekd generate``."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tower, llm = model.llava.vision_tower, model.llava.llm
    base = {k: v for k, v in tower.state_dict().items() if not any(s in k for s in _MOLE_KEYS)}
    tower.save_pretrained(tmp / "vision", state_dict=base)
    use_cache = llm.config.use_cache
    llm.config.use_cache = True  # inference default in the saved config, as LLaVA does
    try:
        llm.save_pretrained(tmp / "llm")
    finally:
        llm.config.use_cache = use_cache
    names = new_module_parameter_names(model)
    extras = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n in names}
    save_file(extras, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    meta = _metadata(model)
    if inference is not None:
        meta["inference"] = dict(inference)
    (tmp / META).write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    _replace_dir(tmp, out)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(path) -> dict:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise ValueError(
            f"{path} is not a movekd student export (no {META}); create one with student.export.export_pretrained"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')!r} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}; re-export it with this movekd"
        )
    return meta


def load_pretrained(
    path, torch_dtype: torch.dtype | None = None, attn_implementation: str | None = None, kd: KDConfig | None = None
) -> DistillModel:
    """Rebuild an exported student (tower + MoLE, projector, LLM, adapters) in one call.

    All parameters come back frozen except MoLE's (``add_mole``'s default); callers that train
    apply ``set_trainable``. ``kd`` overrides the KD config stored in the export."""
    path = Path(path)
    meta = read_metadata(path)
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        llava = build_llava(path / "vision", path / "llm", meta["projector"], torch_dtype, attn_implementation)
        llava = LlavaStudent(
            llava.vision_tower, llava.projector, llava.llm, meta["vision_layer"], meta["num_prefix_tokens"]
        )
        mole = MoLEConfig.from_dict(meta["mole"])
        add_mole(llava.vision_tower, mole, freeze_base=True)
        adapters = nn.ModuleDict({n: adapter_from_spec(s) for n, s in meta["adapters"].items()})
    model = DistillModel(
        llava,
        adapters.to(torch_dtype or torch.float32),
        tuple(meta["teachers"]),
        meta["clip_name"],
        kd or KDConfig.from_dict(meta["kd"]),
        mole,
    )
    _load_extras(model, path / WEIGHTS)
    return model.eval()


def _load_extras(model: DistillModel, file: Path) -> None:
    state = load_file(str(file))
    expected = new_module_parameter_names(model)
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(
            f"{file}: does not match the model it describes; missing {missing[:8]}, unexpected {extra[:8]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{file}: {name} has shape {tuple(value.shape)}, the model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(value)


def check_compatible(model: DistillModel, cfg, expected_adapters: nn.ModuleDict, teachers, source=None) -> None:
    """Refuse ``init_from`` exports whose shapes differ from what ``cfg`` and the cache ask for."""
    have = {
        "mole": model.mole_config.to_dict(),
        "projector": model.llava.projector.kind,
        "adapters": {t: adapter_spec(model.adapters[t]) for t in teachers if t in model.adapters},
    }
    want = {
        "mole": cfg.mole.to_dict(),
        "projector": cfg.projector,
        "adapters": {t: adapter_spec(expected_adapters[t]) for t in teachers if t in expected_adapters},
    }
    diffs = diff_dicts(have, want)
    if diffs:
        lines = "\n".join(f"  {p}: init_from={a!r} config={b!r}" for p, a, b in diffs[:12])
        raise ValueError(
            f"init_from {source or cfg.init_from} does not fit this config/cache; "
            f"{len(diffs)} field(s) differ:\n{lines}"
        )
