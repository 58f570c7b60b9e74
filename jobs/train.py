"""``movekd train`` / ``python -m jobs.train``: train the MoLE student from a feature cache.

Single process::

    movekd train --config train_tiny --set cache=DIR/cache --set image_root=DIR/packed ...
    movekd train --config train_tiny --set cache=[DIR/v1.0-cache,DIR/sam-cache] ...  # caches of one pack

Several GPUs or nodes (torch.distributed via torchrun; this entry point reads torchrun's
environment, library code never does)::

    torchrun --nproc_per_node 8 -m jobs.train --config train_v1_0_pretrain
    torchrun --nnodes 2 --node_rank R --master_addr HEAD --master_port 29500 --nproc_per_node 8 \\
        -m jobs.train --config train_v1_0_pretrain

``--init-from-released DIR`` starts from a released MoVE-KD checkpoint (``student.released``).
``--resume`` continues exactly from the newest checkpoint in ``output_dir``; ``--extend`` also lets
a raised ``max_steps``/``epochs`` through (the schedule is re-laid over the new total). ``--online-teachers
EXTRACT_CONFIG`` runs the original MoVE-KD way for reference: the teachers of that extraction
config compute the targets live every step instead of reading them from the cache.

A config may hold a ``tiny_student: {dir: ...}`` block: tiny random-weight CLIP/LLM/tokenizer
are created there (if missing) and used, which is how the bundled sample trains offline.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("movekd.train")

HELP = """Train the MoVE-KD student (MoLE CLIP + adapters + projector + LLM) in LLaVA's two stages,
streaming teacher targets from a feature cache. Checkpoints are atomic; --resume is exact."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="YAML config: a file path or a preset name from jobs/configs (train_tiny, "
        "train_v1_0_pretrain, train_v1_0_finetune)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field (dotted keys, YAML values), e.g. --set lr=2e-5 "
        "--set kd.teacher_weighting=paper --set mole.rank=16; repeatable",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        default=None,
        choices=["yes", "auto"],
        help="continue exactly from the newest checkpoint in output_dir; a bare --resume refuses to start "
        "when there is none (so a wrong output_dir is not silently a new run), --resume auto starts fresh "
        "then (for schedulers that rerun the same command)",
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="continue a run (finished or not) whose max_steps or epochs you raised, e.g. --resume --extend "
        "--max-steps 20000: weights, optimizer, RNG and data order continue exactly and the warmup + cosine "
        "schedule is re-laid over the new total (logged, and recorded in the checkpoints); implies --resume; "
        "any other change is still refused",
    )
    p.add_argument(
        "--online-teachers",
        metavar="EXTRACT_CONFIG",
        help="compute the targets live with the teachers of this extraction config/preset "
        "(reference mode, as in the original MoVE-KD) instead of reading the cache",
    )
    p.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=N")
    p.add_argument(
        "--init-from-released",
        metavar="DIR",
        help="start from a released MoVE-KD checkpoint folder (shortcut for --set init_from_released=DIR; "
        "its CLIP config comes from vision_tower, its tokenizer is the default tokenizer)",
    )
    p.add_argument("--no-export", action="store_true", help="do not export the trained student at the end")
    p.add_argument("--print-config", action="store_true", help="print the resolved TrainConfig as JSON and exit")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the MoLE student from a feature cache", description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    from jobs.config import load_config, parse_overrides

    return load_config(
        args.config,
        parse_overrides(args.overrides, max_steps=args.max_steps, init_from_released=args.init_from_released),
        kind="train",
    )


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"


def init_distributed() -> Dist:
    """torchrun's environment -> a process group (NCCL on GPU, gloo on CPU) and this rank's device."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, local, device)


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group cleanly: a barrier (no rank tears the group down while a peer still
    has a collective in flight; gloo then aborts the peer with "terminate called without an active
    exception"), then ``destroy_process_group``. A no-op without a group. ``barrier=False`` after
    a failure, when the peers may never arrive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def student_preprocess(cfg):
    """What the student's CLIP sees: LLaVA's CLIP processor at the tower's size, the stage's aspect
    and the alpha mode (``image_alpha``; it must match the cache's, which ``DistillDataset`` checks)."""
    from transformers import AutoConfig

    from cache.manifest import PreprocessSpec

    path = os.path.join(cfg.init_from, "vision") if cfg.init_from else cfg.vision_tower
    vcfg = AutoConfig.from_pretrained(path)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    return PreprocessSpec(resolution=int(vcfg.image_size), aspect=cfg.image_aspect_ratio, alpha=cfg.image_alpha)


def build_training(cfg, dist_info: Dist, online: str | None = None):
    """Everything the Trainer needs, built from the config (also used by tests and benchmarks)."""
    import torch

    if online:
        from jobs.online_teachers import online_config

        cfg = online_config(cfg)

    from cache.multi import open_caches
    from jobs.image_source import PackedImageSource, check_pack_matches_cache, records_from_packed
    from student.conversation import load_tokenizer
    from student.data import DistillDataset, collate_distill
    from student.model import build_student
    from student.sampler import DistributedLengthGroupedSampler
    from student.trainer import Trainer

    cache = open_caches(cfg.cache)  # one cache, or several of one pack joined by image key
    check_pack_matches_cache(cfg.image_root, cache)
    records = records_from_packed(cfg.image_root, cfg.data_json)
    tokenizer = load_tokenizer(cfg.tokenizer_path)  # pad = unk when it has none, as LLaVA
    images = PackedImageSource(cfg.image_root)
    dataset = DistillDataset(
        records,
        images,
        cache,
        tokenizer,
        preprocess=student_preprocess(cfg),
        template=cfg.template,
        teachers=cfg.teachers,
        max_length=cfg.max_length,
        encoded_targets=not online and cfg.decode_targets_on_device(dist_info.device),  # online: teachers fill them
    )
    for reason, info in {**records.skipped, **dataset.skipped}.items():
        log.warning("skipped %d rows: %s (e.g. %s)", info["count"], reason, ", ".join(info["examples"][:3]))
    kept = dataset.counts
    log.info(
        "data: %d rows (%d with an image, %d text-only); %d image rows without <image> kept as LLaVA keeps them",
        kept["rows"],
        kept["rows_with_image"],
        kept["rows_text_only"],
        kept["image_without_placeholder"]["count"],
    )
    sampler = DistributedLengthGroupedSampler.from_dataset(
        dataset,
        cfg.batch_size,
        grouping="modality_length" if cfg.group_by_modality_length else "none",
        world_size=dist_info.world_size,
        rank=dist_info.rank,
        seed=cfg.seed,
    )
    collate = functools.partial(collate_distill, pad_token_id=tokenizer.pad_token_id)
    if online:
        from jobs.online_teachers import OnlineTargets

        collate = OnlineTargets.from_config(online, images, collate, dist_info.device, dataset.teachers)
    bf16 = torch.device(dist_info.device).type == "cuda"
    model = build_student(cfg, cache.manifest, compute_dtype=torch.bfloat16 if bf16 else None)
    trainer = Trainer(
        cfg,
        model,
        dataset,
        collate,
        sampler,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        device=dist_info.device,
    )
    return trainer, tokenizer


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the dataset tokenises before workers fork
    from jobs.cli import user_error
    from jobs.config import CONFIG_ERRORS

    try:
        cfg = resolve_config(args)
    except CONFIG_ERRORS as e:
        return user_error("movekd train", f"bad config: {e}")
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    unset = [
        k
        for k in ("cache", "data_json", "image_root")
        if not getattr(cfg, k) and not (k == "cache" and args.online_teachers)
    ]
    if unset:
        sets = " ".join(f"--set {k}=..." for k in unset)
        return user_error(
            "movekd train",
            f"the config leaves {', '.join(unset)} unset (presets ship without data paths): pass {sets}",
        )
    from student.checkpoint import find_latest

    if args.extend and not args.resume:
        args.resume = "yes"
    latest = find_latest(cfg.output_dir) if args.resume else None
    if args.resume == "yes" and latest is None:
        return user_error(
            "movekd train",
            f"--{'extend' if args.extend else 'resume'}: no checkpoint in {cfg.output_dir} to continue; run without "
            "--resume to start a new run there, or use --resume auto (start fresh when there is none)",
        )
    if latest is not None:
        log.info("resuming from %s", latest)
    elif args.resume:
        log.info("--resume auto: no checkpoint in %s yet, starting a new run", cfg.output_dir)
    from cache.diskfull import DiskFullError, disk_full_as_error

    dist_info = init_distributed()
    try:
        with disk_full_as_error(cfg.output_dir):  # logs, plots: checkpoints name their own folder
            trainer, tokenizer = build_training(cfg, dist_info, args.online_teachers)
            state = trainer.train(resume=bool(args.resume), extend=args.extend)
    except (ValueError, DiskFullError) as e:  # bad cache/config/checkpoint, full disk: one line, no traceback
        shutdown_distributed(barrier=False)  # peers may never reach a barrier now: do not wait for them
        return user_error("movekd train", e)
    shutdown_distributed()
    if dist_info.rank == 0:
        print(f"trained to step {state.step} (epoch {state.epoch}); log {trainer.log_path}, plot {trainer.plot_path}")
        if not args.no_export and not (dist_info.world_size > 1 and cfg.distributed == "fsdp"):
            from student.export import export_pretrained

            inference = {"template": cfg.template, "preprocess": student_preprocess(cfg).to_dict()}
            with disk_full_as_error(os.path.join(cfg.output_dir, "export")):
                out = export_pretrained(trainer.model, os.path.join(cfg.output_dir, "export"), tokenizer, inference)
            print(f"exported the trained student to {out} (load with student.export.load_pretrained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_module

    return run_module("python -m jobs.train", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
