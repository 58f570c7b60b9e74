"""Atomic, exactly-resumable training checkpoints.

Layout under the run's output dir::

    step-0000400/            a complete checkpoint (renamed from step-0000400.tmp/ when done)
      model.safetensors      parameters by DistillModel name: every trainable one plus the new
                             modules (MoLE, projector, adapters); frozen pretrained weights come
                             from the configured source paths again
      optimizer.pt           {"optimizer": AdamW state keyed by parameter NAME, "scheduler": ...}
      rng-rank00000.pt       python / numpy / torch CPU / CUDA RNG states, one file per rank
      trainer_state.json     step, epoch, cursor, world size, the sampler's state_dict (JSON),
                             config fingerprint, full config, and "extensions": the
                             run's --extend history ([{"step", "total_steps": [old, new],
                             "max_steps"/"epochs": [old, new]}])
    latest                   "step-0000400", written atomically (tmp + os.replace) LAST

Decisions:
- Atomicity: files go into ``step-N.tmp/``; rank 0 renames it to ``step-N/`` with ``os.replace``
  and then updates ``latest``. A crash leaves at worst a ``.tmp`` dir (ignored by the loader,
  removed by the next save) or a complete dir that ``latest`` does not name yet (the loader falls
  back to the highest complete ``step-*``). ``keep_last_k`` prunes older complete dirs after that.
- Nothing is unpickled: weights are safetensors; ``.pt`` files hold only tensors and plain
  containers and are read with ``torch.load(weights_only=True)``. Tied weights are stored once
  (``named_parameters`` de-duplicates shared tensors; loading into one fills both).
- Optimizer state is keyed by parameter name, not position, so a checkpoint cannot silently load
  into a differently ordered parameter list. FSDP2 models go through
  ``torch.distributed.checkpoint.state_dict`` full-state helpers (collective on every rank).
- Compatibility: the fingerprint holds what makes a continuation exact and the shapes sane --
  stage, teachers, MoLE/KD/projector/adapter configs, trainable set, every parameter's shape, the
  optimisation trajectory (lr, schedule, epochs, max_steps, batch, accumulation, world size, seed).
  Paths, logging and IO knobs are not in it (moving a run dir is fine). A mismatch raises
  ``CheckpointMismatchError`` naming each differing field. The one exception is asked for:
  ``extend`` lets ``EXTENDABLE`` (max_steps, epochs) grow; the restored state is exact and the
  schedule's lr from the resumed step on is the new plan's (``relay_schedule``).
- Multi-rank saving assumes a filesystem shared by the ranks (each writes its own RNG file).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cache.diskfull import DiskFullError, disk_full_as_error
from cache.manifest import diff_dicts
from student.config import TrainConfig
from student.trainable import new_module_parameter_names

FORMAT, FORMAT_VERSION = "movekd-train-checkpoint", 1
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a run whose configuration differs where it matters."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class TrainState:
    """Where the run is: optimizer steps done, and the sampler position (epoch, samples consumed
    by this rank in that epoch)."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def saved_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad} | new_module_parameter_names(model)


def fingerprint(
    cfg: TrainConfig, model: nn.Module, world_size: int, samples_per_epoch: int | None = None
) -> dict[str, Any]:
    """The fields that must match for a checkpoint to continue this run exactly
    (``samples_per_epoch``: this rank's share, which changes with the dataset)."""
    trajectory = (
        "lr",
        "weight_decay",
        "warmup_ratio",
        "schedule",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "max_grad_norm",
        "seed",
        "group_by_modality_length",
    )
    return {
        "stage": cfg.stage,
        "teachers": list(model.teachers),
        "clip_name": model.clip_name,
        "mole": cfg.mole.to_dict(),
        "kd": cfg.kd.to_dict(),
        "projector": cfg.projector,
        "adapter_kind": cfg.adapter_kind,
        "tune_vision_base": cfg.tune_vision_base,
        "optimization": {k: getattr(cfg, k) for k in trajectory},
        "world_size": world_size,
        "samples_per_epoch": samples_per_epoch,
        "parameters": {
            n: "x".join(map(str, p.shape)) + (" trainable" if p.requires_grad else "")
            for n, p in model.named_parameters()
        },
    }


# The fields ``Trainer.train(extend=True)`` (``movekd train --extend``) may raise on resume: the
# run's length. The warmup + cosine schedule is then re-laid over the new total (``relay_schedule``).
EXTENDABLE = ("optimization.max_steps", "optimization.epochs")


def extension_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """The ``EXTENDABLE`` fields that differ, as (field, checkpoint, now); ``ValueError`` if one
    shrinks (``max_steps: null`` means uncapped, the longest)."""
    changes = [d for d in diff_dicts(saved, current) if d[0] in EXTENDABLE]
    for name, old, new in changes:
        longer = new is None or (old is not None and new > old)
        if not longer:
            raise ValueError(
                f"--extend can only make a run longer: {name.split('.')[-1]} is {old!r} in the checkpoint "
                f"and {new!r} now; resume with {old!r} or more, or start a new output_dir"
            )
    return changes


def check_fingerprint(saved: dict, current: dict, where: Path, allow: tuple[str, ...] = ()) -> None:
    """Raise ``CheckpointMismatchError`` listing every differing config field first, then (at most
    six of) the differing parameter shapes/trainable flags with their count. Fields in ``allow``
    may differ."""
    diffs = [d for d in diff_dicts(saved, current) if d[0] not in allow]
    if not diffs:
        return
    config = [d for d in diffs if not d[0].startswith("parameters.")]
    params = [d for d in diffs if d[0].startswith("parameters.")]
    lines = [f"  {p}: checkpoint={a!r} now={b!r}" for p, a, b in config + params[:6]]
    if len(params) > 6:
        lines.append(f"  ... and {len(params) - 6} more parameter(s)")
    raise CheckpointMismatchError(
        f"checkpoint {where} was written with an incompatible configuration; {len(diffs)} field(s) "
        "differ:\n" + "\n".join(lines) + "\n" + _mismatch_hint(diffs),
        [p for p, _, _ in diffs],
    )


def _mismatch_hint(diffs: list) -> str:
    if all(d[0] in EXTENDABLE for d in diffs):
        return (
            "To run this finished or running training longer, resume with --extend (Trainer.train(extend=True)): "
            "the warmup + cosine schedule is then re-laid over the new total."
        )
    return (
        "Resume with the original configuration, or start a new output_dir "
        "(use init_from with an exported model to start a new stage)."
    )


def relay_schedule(scheduler) -> list[float]:
    """Set every group's lr to the (new) schedule's value at the scheduler's current step; return
    the lrs. After an extension the restored lr is the old plan's; the next step must use the new."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports (torch keeps no public setter)
    return lrs


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- weights and optimizer -----------------------------------------------------------------------
def gather_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the saved parameters. When FSDP-sharded this is a collective on every rank
    and only rank 0 gets the tensors (others get ``{}``: ``cpu_offload`` gathers to rank 0)."""
    names = saved_parameter_names(model)
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: full[n].contiguous() for n in sorted(names)} if full else {}
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if n in names}


def load_weights(model: nn.Module, path) -> None:
    """Load a checkpoint's ``model.safetensors`` into ``model`` (unsharded, or FSDP2 on every rank)."""
    file = Path(path) / "model.safetensors"
    state = load_file(str(file))
    expected = saved_parameter_names(model)
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointMismatchError(
            f"{file} does not fit this model: missing {missing[:8]}, unexpected {extra[:8]}", missing + extra
        )
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [[by_id[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (collective when FSDP-sharded)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    sd, names = optimizer.state_dict(), _param_names(model, optimizer)
    flat = [n for group in names for n in group]
    groups = [{**g, "params": [flat[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {flat[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = _param_names(model, optimizer)
    saved = [g["params"] for g in state["param_groups"]]
    if saved != names:
        raise CheckpointMismatchError(
            "the checkpoint's optimizer holds different parameters than this model's trainable set",
            ["optimizer.param_groups"],
        )
    index = {n: i for i, n in enumerate(n for group in names for n in group)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups})


# -- directory handling ----------------------------------------------------------------------------
def complete_checkpoints(root) -> list[Path]:
    """Complete ``step-*`` dirs under ``root``, oldest first (``.tmp`` leftovers are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def find_latest(root) -> Path | None:
    """The checkpoint ``latest`` names, else the highest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clean_partial(root) -> list[Path]:
    """Remove leftover ``*.tmp`` checkpoint dirs (interrupted saves); returns what was removed."""
    root = Path(root)
    stale = [p for p in root.glob("step-*.tmp") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prune(root, keep_last_k: int) -> None:
    done = complete_checkpoints(root)
    latest = find_latest(root)
    for p in done[:-keep_last_k] if keep_last_k > 0 else []:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def _noop() -> None:
    pass


def save_checkpoint(
    root,
    state: TrainState,
    model: nn.Module,
    optimizer,
    scheduler,
    fp: dict,
    cfg: TrainConfig,
    *,
    rank: int = 0,
    barrier: Callable[[], None] = _noop,
    sampler_state: dict | None = None,
    extensions: list[dict] | tuple = (),
) -> Path:
    """Write ``step-N/`` atomically (every rank calls this; rank 0 writes the shared files).

    ``extensions`` (the run's ``--extend`` history: step, fields before and after) is recorded in
    ``trainer_state.json`` and carried by every later checkpoint.

    A full disk is a ``DiskFullError`` naming the checkpoint folder and the free space (torch's
    zip writer says only "unexpected pos"); the partial ``step-N.tmp/`` is removed, the previous
    checkpoints are untouched."""
    root = Path(root)
    tmp = root / f"{step_dir_name(state.step)}.tmp"
    try:
        with disk_full_as_error(tmp):
            parts = (state, model, optimizer, scheduler, fp, cfg)
            return _save_checkpoint(
                root, *parts, rank=rank, barrier=barrier, sampler_state=sampler_state, extensions=list(extensions)
            )
    except DiskFullError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give back what the partial save took
        raise


def _save_checkpoint(
    root: Path, state, model, optimizer, scheduler, fp, cfg, *, rank, barrier, sampler_state, extensions
) -> Path:
    name = step_dir_name(state.step)
    tmp, final = root / f"{name}.tmp", root / name
    weights, optim = gather_weights(model), optimizer_state(model, optimizer)  # collectives first
    if rank == 0:
        clean_partial(root)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "epoch": state.epoch,
            "cursor": state.cursor,
            "world_size": fp["world_size"],
            "sampler": sampler_state,
            "fingerprint": fp,
            "config": cfg.to_dict(),
            "extensions": extensions,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
        prune(root, cfg.keep_last_k)
    barrier()
    return final


def read_trainer_state(path) -> dict:
    file = Path(path) / "trainer_state.json"
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: not a {FORMAT} v{FORMAT_VERSION} checkpoint "
            f"(format={meta.get('format')!r}, version={meta.get('format_version')!r})"
        )
    return meta


def load_checkpoint(
    path, model: nn.Module, optimizer, scheduler, fp: dict, *, rank: int = 0, allow: tuple[str, ...] = ()
) -> TrainState:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the run position.

    Raises ``CheckpointMismatchError`` (naming the fields) if ``fp`` differs from the saved one
    (outside the fields in ``allow``)."""
    path = Path(path)
    meta = read_trainer_state(path)
    check_fingerprint(meta["fingerprint"], fp, path, allow)
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path} has no RNG state for rank {rank} (written with world size {meta['world_size']})")
    load_weights(model, path)
    blob = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    load_optimizer_state(model, optimizer, blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainState(step=meta["step"], epoch=meta["epoch"], cursor=meta["cursor"])
