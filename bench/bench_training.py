"""Training step time and peak memory: targets from the cache vs online teachers (``--online-teachers``,
``jobs.online_teachers.OnlineTargets``), same student, LLM, data and batches.

Shapes are v1.0's scaled down so the teacher-to-step compute ratio stays v1.0's (``train_setup``):
student CLIP 112 px / 8x8 tokens x 128-d, LLM Llama 512-d x 4 layers; teachers CLIP (the
student's architecture), EVA-02 (20x20 tokens) and ConvNeXt-XXL stages (12x12 x 256) at 384 px.
FLOPs are counted, not assumed: ``torch.utils.flop_counter`` (matmul / conv / attention, 2 per
multiply-add) over one real batch: the student's training step (forward + backward) and each
teacher's forward. v1.0 for comparison: teachers 9.6 TFLOP/img (docs/method.md §7); the 7B
step per sample is 2 x 6.7e9 x ~640 tokens = 8.6 TFLOP forward, x3 in stage 1 (forward, recompute
under gradient checkpointing, input-gradient backward through the frozen LLM) = ~26 TFLOP, x4 in
stage 2 (weight gradients too) = ~34 TFLOP: teachers add +28 to +37 %.

Decisions:
- Time, paired: one child process per round builds both trainers (``build_training(cfg, Dist(),
  online)``, same seed: same weights, same batches) and alternates single steps, cached then
  online then online then cached..., so both modes see the same machine load (the 2 cores are
  shared and their speed drifts by 2x within minutes). A step is what ``Trainer`` runs per
  optimizer step (``student.train_loop``: next batch = load + cache read or teacher forward +
  collate, ``accumulate_window`` forward/backward, ``optimizer_step``), timed end to end; the
  first ``--warmup`` steps per mode are dropped. Ratios are of medians; per-round ratios show
  the spread.
- Memory, separate: a fresh child process per mode runs ``Trainer.train`` for ``--mem-steps``
  steps; peak RSS (``VmHWM`` from /proc/self/status, reset to the current RSS once every module
  either mode needs is imported, read when the final checkpoint save starts) minus the RSS at that
  reset, i.e. the peak growth over ``build_training`` and the training steps. Modes alternate
  over ``--mem-rounds``; their logged ``step_time_s`` is reported too, as a second estimate.
- Both modes collate in the training process (``num_workers=0``; online mode requires it), so the
  cached step includes reading and dequantising the targets: the cached side is not flattered by
  overlap with loader workers. The online reference mode still reads (and then replaces) the
  cached targets; that read is timed and reported, and the ratio is also given without it.
- One torch thread by default: the 2 cores are shared with other jobs, and one thread keeps the
  measurement steady. The teachers run in the training process, on the same thread, as online
  MoVE-KD runs them on the training GPU.

Run: ``.venv/bin/python bench/bench_training.py [--rounds 2] [--steps 12] [--warmup 2] [--mem-rounds 3]
[--codec int8]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import train_setup as setup  # noqa: E402

MODES = ("cached", "online")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=2, help="paired timing processes (default 2)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per mode per round (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="steps per mode dropped at the start (default 2)")
    p.add_argument("--mem-rounds", type=int, default=3, help="memory processes per mode, alternating (default 3)")
    p.add_argument("--mem-steps", type=int, default=4, help="training steps of a memory process (default 4)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch (default 4, the train_tiny preset's)")
    p.add_argument("--codec", default="int8", help="cache codec (default int8, the v1.0 presets')")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    p.add_argument("--workdir", help="keep models/data/cache here (default: a temporary directory)")
    p.add_argument("--child", choices=MODES + ("paired",), help=argparse.SUPPRESS)
    p.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the work directory ----------------------------------------------------------------------------
def prepare(work: str, args: argparse.Namespace) -> dict:
    """Scaled student and teachers, packed photos, the cache and the online extraction config."""
    images = args.batch * (args.warmup + max(args.steps, args.mem_steps))  # one epoch: no loader restart
    student = setup.scaled_student(os.path.join(work, "student"))
    teachers = setup.scaled_teachers(os.path.join(work, "teachers"))
    packed, data_json = setup.photo_pack(os.path.join(work, f"data-{images}"), images)
    cache = setup.extract_cache(packed, os.path.join(work, f"cache-{args.codec}-{images}"), teachers, args.codec)
    online = setup.write_extract_yaml(os.path.join(work, "online_teachers.yaml"), teachers)
    return {
        "student": student,
        "packed": packed,
        "data_json": data_json,
        "cache": cache,
        "online": online,
        "images": images,
    }


def spawn(work: str, args: argparse.Namespace, mode: str, tag: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--tag", tag, "--workdir", work]
    for flag in ("steps", "warmup", "mem_steps", "batch", "codec", "threads"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- child processes --------------------------------------------------------------------------------
def preload() -> None:
    """Import what either mode needs, so module memory is not counted in one mode's delta."""
    import timm  # noqa: F401
    import transformers  # noqa: F401

    import jobs.online_teachers  # noqa: F401
    import jobs.train  # noqa: F401
    import pipeline.teachers  # noqa: F401
    import student.model  # noqa: F401
    import student.trainer  # noqa: F401


def build(args: argparse.Namespace, mode: str, max_steps: int):
    from jobs.train import Dist, build_training

    p = prepare(args.workdir, args)
    out = os.path.join(args.workdir, "runs", f"{args.child}-{mode}-{args.tag}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = setup.scaled_train_config(
        p["student"],
        cache=p["cache"],
        image_root=p["packed"],
        data_json=p["data_json"],
        output_dir=out,
        batch_size=args.batch,
        num_workers=0,
        max_steps=max_steps,
        save_every=10**6,
        plot=False,
        progress_bar=False,
    )
    trainer, _ = build_training(cfg, Dist(), p["online"] if mode == "online" else None)
    return trainer


def timed(obj, name: str, calls: dict, key: str) -> None:
    """Wrap ``obj.name`` so the wall time of every call is appended to ``calls[key]``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            calls.setdefault(key, []).append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def instrument(trainer) -> dict[str, list[float]]:
    """Per-call times of the cache read, each teacher's forward and the collate (one each per step)."""
    calls: dict[str, list[float]] = {}
    timed(trainer.dataset.cache, "read", calls, "cache_read")
    for name, teacher in getattr(trainer.collate_fn, "teachers", {}).items():
        timed(teacher, "encode", calls, f"teacher/{name}")
    timed(trainer, "collate_fn", calls, "collate")
    return calls


def child_paired(args: argparse.Namespace) -> dict:
    """Both trainers in one process, single steps alternating; then the FLOP counts."""
    preload()
    import torch

    from student.train_loop import accumulate_window, make_loader, optimizer_step

    n = args.warmup + args.steps
    trainers = {m: build(args, m, n) for m in MODES}
    online = trainers["online"].collate_fn
    calls = {m: instrument(t) for m, t in trainers.items()}
    batches = {}
    for m, t in trainers.items():
        t.model.train()
        batches[m] = iter(
            make_loader(
                t.dataset,
                t.position.epoch_sampler(0, 0),
                t.collate_fn,
                args.batch,
                0,
                num_workers=0,
                seed=t.cfg.seed,
                pin_memory=False,
            )
        )
    times, first = {m: [] for m in MODES}, {}
    for i in range(n):
        for m in MODES if i % 2 == 0 else MODES[::-1]:
            t = trainers[m]
            torch.manual_seed(t.cfg.seed + i)  # same RNG stream for both modes
            start = time.perf_counter()
            parts, _ = accumulate_window(t.module, batches[m], 1, torch.device("cpu"), False, t.image_tokens)
            optimizer_step(t.optimizer, t.scheduler, t.params, t.cfg.max_grad_norm)
            times[m].append(time.perf_counter() - start)
            first.setdefault(m, {k: float(parts[k]) for k in ("loss/kd", "loss/text")})
    per_step = {m: {k: statistics.median(v[args.warmup :]) for k, v in calls[m].items()} for m in MODES}
    return {
        "tag": args.tag,
        "step_s": {m: times[m][args.warmup :] for m in MODES},
        "per_step": per_step,
        "first_losses": first,
        "flops": count_flops(trainers["cached"], online, args.batch),
    }


def count_flops(trainer, online, batch_size: int) -> dict:
    """FLOPs of one training step (per sample) and of each teacher's forward (per image)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cache.preprocess import preprocess_image
    from student.train_loop import accumulate_window

    batch = online(trainer.dataset.read_batch(list(range(batch_size))))
    pictures = [online.images(k) for k in batch["keys"]]
    out = {"teachers": {}, "params": {}}
    for name, teacher in online.teachers.items():
        pixels = np.stack([preprocess_image(p, teacher.preprocess_spec) for p in pictures])
        with FlopCounterMode(display=False) as counter:
            teacher.encode(torch.from_numpy(pixels))
        out["teachers"][name] = counter.get_total_flops() / len(pictures)
        out["params"][name] = sum(p.numel() for p in teacher.model.parameters())
    with FlopCounterMode(display=False) as counter:
        accumulate_window(trainer.module, iter([batch]), 1, torch.device("cpu"), False, trainer.image_tokens)
    out["step_per_sample"] = counter.get_total_flops() / batch_size
    out["tokens_per_sample"] = float(batch["attention_mask"].sum()) / batch_size + trainer.image_tokens - 1
    out["params"]["llm"] = sum(p.numel() for p in trainer.model.llava.llm.parameters())
    out["params"]["student"] = sum(p.numel() for p in trainer.model.parameters())
    out["params"]["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return out


def child_memory(args: argparse.Namespace) -> dict:
    """One mode in a fresh process through ``Trainer.train``: peak RSS over build + training."""
    from student.logging_utils import read_jsonl

    preload()
    setup.reset_rss_peak()
    base = setup.rss_now_mb()
    trainer = build(args, args.child, args.mem_steps)
    built = setup.rss_now_mb()
    teachers = getattr(trainer.collate_fn, "teachers", {})
    peak: list[float] = []
    save = trainer.save

    def save_after_peak():  # the final checkpoint's serialisation is no training step: peak before it
        peak.append(setup.rss_peak_mb())
        return save()

    trainer.save = save_after_peak
    trainer.train()
    logged = [r["step_time_s"] for r in read_jsonl(trainer.log_path)]
    steps = logged[1:] or logged  # the first step pays for loader start-up
    return {
        "mode": args.child,
        "tag": args.tag,
        "step_s": steps,
        "rss_base_mb": base,
        "rss_built_mb": built,
        "rss_peak_mb": peak[0],
        "teacher_weights_mb": sum(p.numel() * p.element_size() for t in teachers.values() for p in t.model.parameters())
        / 2**20,
    }


# -- report ---------------------------------------------------------------------------------------
def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def flops_table(f: dict) -> str:
    step = f["step_per_sample"]
    total = sum(f["teachers"].values())
    lines = [
        "| component | params | GFLOP per image / sample | vs student step | v1.0 (docs/method.md §7) |",
        "|---|---:|---:|---:|---:|",
        f"| student training step (fwd + bwd) | {fmt_params(f['params']['student'])} (LLM "
        f"{fmt_params(f['params']['llm'])}; {fmt_params(f['params']['trainable'])} trainable) | "
        f"{step / 1e9:.2f} | 1 | ~26-34 TFLOP |",
    ]
    v1 = {"clip": "0.4 TFLOP", "eva": "2.9 TFLOP", "convnext": "6.3 TFLOP"}
    for name, fl in f["teachers"].items():
        lines.append(
            f"| teacher {name} (forward) | {fmt_params(f['params'][name])} | {fl / 1e9:.2f} | "
            f"{100 * fl / step:.1f} % | {v1.get(name, '-')} |"
        )
    lines.append(
        f"| teachers, total | {fmt_params(sum(f['params'][n] for n in f['teachers']))} | "
        f"{total / 1e9:.2f} | **{100 * total / step:.0f} %** | 9.6 TFLOP: +28-37 % |"
    )
    return "\n".join(lines)


def timing_table(paired: list[dict], batch: int) -> tuple[str, dict]:
    lines = [
        "| mode | median step (s) | min - max (s) | steps | images/s | collate (s/step) | of which teacher "
        "forward (s/step) | cache read (s/step) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    med = {}
    for m in MODES:
        steps = [x for r in paired for x in r["step_s"][m]]
        per = {
            k: statistics.median(r["per_step"][m].get(k, 0.0) for r in paired)
            for k in sorted({k for r in paired for k in r["per_step"][m]})
        }
        med[m] = {"step": statistics.median(steps), "read": per.get("cache_read", 0.0)}
        teach = {k.split("/")[1]: v for k, v in per.items() if k.startswith("teacher/")}
        parts = f"{sum(teach.values()):.3f} ({', '.join(f'{k} {v:.3f}' for k, v in teach.items())})" if teach else "-"
        lines.append(
            f"| {m} | {med[m]['step']:.3f} | {min(steps):.3f} - {max(steps):.3f} | {len(steps)} | "
            f"{batch / med[m]['step']:.1f} | {per.get('collate', 0):.3f} | {parts} | {med[m]['read']:.3f} |"
        )
    return "\n".join(lines), med


def memory_table(mem: list[dict]) -> tuple[str, dict]:
    lines = [
        "| mode | peak RSS delta (MB), median | per run | RSS after build delta (MB) | "
        "median step, separate processes (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    out = {}
    for m in MODES:
        rs = [r for r in mem if r["mode"] == m]
        peaks = [r["rss_peak_mb"] - r["rss_base_mb"] for r in rs]
        out[m] = statistics.median(peaks)
        built = statistics.median(r["rss_built_mb"] - r["rss_base_mb"] for r in rs)
        steps = statistics.median(x for r in rs for x in r["step_s"])
        lines.append(f"| {m} | {out[m]:.0f} | {', '.join(f'{x:.0f}' for x in peaks)} | {built:.0f} | {steps:.3f} |")
    out["teacher_weights_mb"] = max(r["teacher_weights_mb"] for r in mem)
    return "\n".join(lines), out


def ratio_table(paired: list[dict], med: dict, mem: dict) -> str:
    c, o = med["cached"], med["online"]
    per_round = [statistics.median(r["step_s"]["cached"]) / statistics.median(r["step_s"]["online"]) for r in paired]
    lines = [
        "| measure | value |",
        "|---|---:|",
        f"| cached / online step time (medians, paired steps) | **{c['step'] / o['step']:.2f}** |",
        f"| per round (paired process) | {', '.join(f'{x:.2f}' for x in per_round)} |",
        f"| cached / online, online without its (discarded) cache read | {c['step'] / (o['step'] - o['read']):.2f} |",
        f"| same, cache read hidden (as loader workers would on spare cores) | "
        f"{(c['step'] - c['read']) / (o['step'] - o['read']):.2f} |",
        f"| teachers' memory that disappears (peak RSS delta, online - cached) | "
        f"{mem['online'] - mem['cached']:.0f} MB |",
        f"| of which teacher weights (fp32 parameters) | {mem['teacher_weights_mb']:.1f} MB |",
    ]
    return "\n".join(lines)


def report(args, prep: dict, paired: list[dict], mem: list[dict], wall: float) -> None:
    flops = paired[0]["flops"]
    first = paired[0]["first_losses"]
    timing, med = timing_table(paired, args.batch)
    memory, peaks = memory_table(mem)
    print("# Training: cached targets vs online teachers (scaled-down v1.0 shapes, CPU)\n")
    print(f"- command: `{' '.join(['.venv/bin/python bench/bench_training.py', *sys.argv[1:]])}`")
    print(f"- machine: {setup.machine()}; torch threads {args.threads}; no GPU; date {date.today()}")
    print(
        f"- stage 1 (train_tiny recipe), batch {args.batch}, {args.codec} cache of {prep['images']} real photos "
        f"(512 px JPEG), ~{flops['tokens_per_sample']:.0f} LLM tokens per sample; {args.rounds} paired rounds x "
        f"{args.steps} steps per mode (+{args.warmup} warm-up), {args.mem_rounds} memory runs per mode; "
        f"wall time {wall:.0f} s"
    )
    print(
        f"- sanity, first step (same batch, same weights): KD loss cached {first['cached']['loss/kd']:.5f} vs "
        f"online {first['online']['loss/kd']:.5f}; text loss {first['cached']['loss/text']:.5f} vs "
        f"{first['online']['loss/text']:.5f}\n"
    )
    print(flops_table(flops) + "\n")
    print(timing + "\n")
    print(memory + "\n")
    print(ratio_table(paired, med, peaks))


def run(args: argparse.Namespace, work: str) -> None:
    t0 = time.perf_counter()
    prep = prepare(work, args)
    paired, mem = [], []
    for r in range(max(args.rounds, args.mem_rounds)):
        if r < args.rounds:
            paired.append(spawn(work, args, "paired", str(r)))
            print(
                f"round {r}: paired medians "
                + ", ".join(f"{m} {statistics.median(paired[-1]['step_s'][m]):.3f} s" for m in MODES),
                file=sys.stderr,
            )
        for m in (MODES if r % 2 == 0 else MODES[::-1])[: 2 if r < args.mem_rounds else 0]:
            mem.append(spawn(work, args, m, str(r)))
            print(
                f"round {r}: {m} peak RSS delta {mem[-1]['rss_peak_mb'] - mem[-1]['rss_base_mb']:.0f} MB "
                f"(base {mem[-1]['rss_base_mb']:.0f} MB)",
                file=sys.stderr,
            )
    report(args, prep, paired, mem, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    for k, v in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(k, v)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = child_paired(args) if args.child == "paired" else child_memory(args)
        print(json.dumps(result))
        return 0
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        run(args, os.path.abspath(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-training-") as work:
            run(args, work)
    return 0


if __name__ == "__main__":
    from movekd_compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # an entry point: before anything imports timm/transformers
    sys.exit(main())
