"""Training step time and peak memory: targets from the cache vs online teachers (``--online-teachers``,
``jobs.online_teachers.OnlineTargets``), same student, LLM, data and batches.

Shapes are v1.0's scaled down so the teacher-to-step compute ratio stays v1.0's (``train_setup``):
student CLIP 112 px / 8x8 tokens x 128-d, LLM Llama 512-d x 4 layers; teachers CLIP (the
student's architecture), EVA-02 (20x20 tokens) and ConvNeXt-XXL stages (12x12 x 256) at 384 px.
FLOPs are counted, not assumed: ``torch.utils.flop_counter`` (matmul / conv / attention, 2 per
multiply-add) over one real batch: the student's training step (forward + backward) and each
teacher's forward. v1.0 for comparison: teachers 9.6 TFLOP/img (REFERENCE section 7); the 7B
step per sample is 2 x 6.7e9 x ~640 tokens = 8.6 TFLOP forward, x3 in stage 1 (forward, recompute
under gradient checkpointing, input-gradient backward through the frozen LLM) = ~26 TFLOP, x4 in
stage 2 (weight gradients too) = ~34 TFLOP: teachers add +28 to +37 %.

Decisions:
- Each measurement is a fresh child process (``--child``), so peak memory is per mode: peak RSS
  (``getrusage`` ru_maxrss) minus the RSS after every module either mode needs is imported, before
  ``build_training``. Modes alternate (cached, online, online, cached, ...) over ``--rounds`` rounds;
  step times are the trainer's own logged ``step_time_s`` (data loading, target reading or teacher
  forward, forward/backward, optimizer), the first ``--warmup`` steps of a run dropped.
- Both modes collate in the training process (``num_workers=0``; online mode requires it), so the
  cached step includes reading and dequantising the targets: the cached side is not flattered by
  overlap with loader workers. The online reference mode still reads (and then replaces) the
  cached targets; that read is timed and reported, and the ratio is also given without it.
- One torch thread by default: the 2 cores are shared with other jobs, and one thread keeps the
  measurement steady. The teachers run in the training process, on the same thread, as online
  MoVE-KD runs them on the training GPU.

Run: ``.venv/bin/python bench/bench_training.py [--rounds 3] [--steps 8] [--warmup 2] [--codec int8]``.
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (cached, online) runs, order alternating (default 3)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run (default 2)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch (default 4, the train_tiny preset's)")
    p.add_argument("--codec", default="int8", help="cache codec (default int8, the v1.0 presets')")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each run (default 1)")
    p.add_argument("--workdir", help="keep models/data/cache here (default: a temporary directory)")
    p.add_argument("--child", choices=MODES + ("flops",), help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the work directory ----------------------------------------------------------------------------
def prepare(work: str, args: argparse.Namespace) -> dict:
    """Scaled student and teachers, packed photos, the cache and the online extraction config."""
    images = args.batch * (args.warmup + args.steps)  # one epoch covers a run: no loader restart
    student = setup.scaled_student(os.path.join(work, "student"))
    teachers = setup.scaled_teachers(os.path.join(work, "teachers"))
    packed, data_json = setup.photo_pack(os.path.join(work, f"data-{images}"), images)
    cache = setup.extract_cache(packed, os.path.join(work, f"cache-{args.codec}-{images}"), teachers, args.codec)
    online = setup.write_extract_yaml(os.path.join(work, "online_teachers.yaml"), teachers)
    return {"student": student, "packed": packed, "data_json": data_json, "cache": cache, "online": online,
            "images": images}


def spawn(work: str, args: argparse.Namespace, mode: str, tag: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--tag", tag, "--workdir", work,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--codec", args.codec, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- one measurement (child process) ---------------------------------------------------------------
def preload() -> None:
    """Import what either mode needs, so module memory is not counted in one mode's delta."""
    import movekd_compat  # noqa: F401
    import timm  # noqa: F401
    import transformers  # noqa: F401

    import jobs.online_teachers  # noqa: F401
    import jobs.train  # noqa: F401
    import pipeline.teachers  # noqa: F401
    import student.model  # noqa: F401
    import student.trainer  # noqa: F401


def build(work: str, args: argparse.Namespace, mode: str, out: str):
    from jobs.train import Dist, build_training

    p = prepare(work, args)
    shutil.rmtree(out, ignore_errors=True)
    cfg = setup.scaled_train_config(
        p["student"], cache=p["cache"], image_root=p["packed"], data_json=p["data_json"], output_dir=out,
        batch_size=args.batch, num_workers=0, max_steps=args.warmup + args.steps, save_every=10**6,
        plot=False, progress_bar=False)
    trainer, _ = build_training(cfg, Dist(), p["online"] if mode != "cached" else None)
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


def child_run(args: argparse.Namespace) -> dict:
    from student.logging_utils import read_jsonl

    preload()
    base = setup.rss_now_mb()
    trainer = build(args.workdir, args, args.child, os.path.join(args.workdir, "runs", f"{args.child}-{args.tag}"))
    built = setup.rss_now_mb()
    calls: dict[str, list[float]] = {}  # one cache read and one forward per teacher per step (batch reads)
    timed(trainer.dataset.cache, "read", calls, "cache_read")
    teachers = getattr(trainer.collate_fn, "teachers", {})
    for name, teacher in teachers.items():
        timed(teacher, "encode", calls, f"teacher/{name}")
    timed(trainer, "collate_fn", calls, "collate")
    peak: list[float] = []
    save = trainer.save

    def save_after_peak():  # the final checkpoint's serialisation is no training step: peak before it
        peak.append(setup.rss_peak_mb())
        return save()

    trainer.save = save_after_peak
    trainer.train()
    records = read_jsonl(trainer.log_path)
    return {"mode": args.child, "tag": args.tag, "step_s": [r["step_time_s"] for r in records[args.warmup:]],
            "tokens": statistics.mean(r["tokens"] for r in records) / args.batch,
            "per_step": {k: statistics.median(v[args.warmup:]) for k, v in calls.items()},
            "rss_base_mb": base, "rss_built_mb": built, "rss_peak_mb": peak[0],
            "teacher_weights_mb": sum(p.numel() * p.element_size() for t in teachers.values()
                                      for p in t.model.parameters()) / 2**20}


def child_flops(args: argparse.Namespace) -> dict:
    """FLOPs of one training step (per sample) and of each teacher's forward (per image)."""
    preload()
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cache.preprocess import preprocess_image
    from student.train_loop import accumulate_window

    trainer = build(args.workdir, args, "online", os.path.join(args.workdir, "runs", "flops"))
    online = trainer.collate_fn
    batch = online(trainer.dataset.read_batch(list(range(args.batch))))
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
    out["step_per_sample"] = counter.get_total_flops() / args.batch
    llava = trainer.model.llava
    out["params"]["llm"] = sum(p.numel() for p in llava.llm.parameters())
    out["params"]["student"] = sum(p.numel() for p in trainer.model.parameters())
    out["params"]["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return out


# -- report ---------------------------------------------------------------------------------------
def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def flops_table(f: dict) -> str:
    step = f["step_per_sample"]
    total = sum(f["teachers"].values())
    lines = ["| component | params | GFLOP per image / sample | vs student step | v1.0 (REFERENCE 7) |",
             "|---|---:|---:|---:|---:|",
             f"| student training step (fwd + bwd) | {fmt_params(f['params']['student'])} (LLM "
             f"{fmt_params(f['params']['llm'])}; {fmt_params(f['params']['trainable'])} trainable) | "
             f"{step / 1e9:.2f} | 1 | ~26-34 TFLOP |"]
    v1 = {"clip": "0.4 TFLOP", "eva": "2.9 TFLOP", "convnext": "6.3 TFLOP"}
    for name, fl in f["teachers"].items():
        lines.append(f"| teacher {name} (forward) | {fmt_params(f['params'][name])} | {fl / 1e9:.2f} | "
                     f"{100 * fl / step:.1f} % | {v1.get(name, '-')} |")
    lines.append(f"| teachers, total | {fmt_params(sum(f['params'][n] for n in f['teachers']))} | "
                 f"{total / 1e9:.2f} | **{100 * total / step:.0f} %** | 9.6 TFLOP: +28-37 % |")
    return "\n".join(lines)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        steps = [s for r in rs for s in r["step_s"]]
        per = {k: statistics.median(r["per_step"].get(k, 0.0) for r in rs)
               for k in sorted({k for r in rs for k in r["per_step"]})}
        out[mode] = {"median": statistics.median(steps), "min": min(steps), "max": max(steps), "n": len(steps),
                     "per_step": per, "tokens": rs[0]["tokens"],
                     "peak": statistics.median(r["rss_peak_mb"] - r["rss_base_mb"] for r in rs),
                     "built": statistics.median(r["rss_built_mb"] - r["rss_base_mb"] for r in rs),
                     "teacher_weights_mb": rs[0]["teacher_weights_mb"],
                     "round_medians": {r["tag"]: statistics.median(r["step_s"]) for r in rs}}
    return out


def timing_table(s: dict, batch: int) -> str:
    lines = ["| mode | median step (s) | min - max (s) | steps | images/s | teacher forward (s/step, median) | "
             "cache read (s/step, median) | peak RSS delta (MB) | RSS after build delta (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        m = s[mode]
        teach = sum(v for k, v in m["per_step"].items() if k.startswith("teacher/"))
        parts = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in m["per_step"].items() if k.startswith("teacher/"))
        lines.append(f"| {mode} | {m['median']:.3f} | {m['min']:.3f} - {m['max']:.3f} | {m['n']} | "
                     f"{batch / m['median']:.1f} | {teach:.3f}{f' ({parts})' if parts else ''} | "
                     f"{m['per_step'].get('cache_read', 0):.4f} | {m['peak']:.0f} | {m['built']:.0f} |")
    return "\n".join(lines)


def ratio_table(s: dict) -> str:
    c, o = s["cached"], s["online"]
    tags = sorted(c["round_medians"], key=int)
    per_round = [c["round_medians"][t] / o["round_medians"][t] for t in tags]
    read_c, read_o = c["per_step"].get("cache_read", 0.0), o["per_step"].get("cache_read", 0.0)
    adjusted = c["median"] / (o["median"] - read_o)
    hidden = (c["median"] - read_c) / (o["median"] - read_o)
    lines = ["| measure | value |", "|---|---:|",
             f"| cached / online step time (medians over all timed steps) | **{c['median'] / o['median']:.2f}** |",
             f"| per round (cached / online, run medians) | {', '.join(f'{x:.2f}' for x in per_round)} |",
             f"| cached / online, online without its (discarded) cache read | {adjusted:.2f} |",
             f"| same, cache read hidden (as loader workers would on spare cores) | {hidden:.2f} |",
             f"| teachers' memory that disappears (peak RSS delta, online - cached) | "
             f"{o['peak'] - c['peak']:.0f} MB |",
             f"| of which teacher weights (fp32 parameters) | {o['teacher_weights_mb']:.1f} MB |"]
    return "\n".join(lines)


def report(args, prep: dict, flops: dict, runs: list[dict], wall: float) -> None:
    s = summarize(runs)
    print("# Training: cached targets vs online teachers (scaled-down v1.0 shapes, CPU)\n")
    print(f"- command: `.venv/bin/python bench/bench_training.py {' '.join(sys.argv[1:])}`".rstrip())
    print(f"- machine: {setup.machine()}; torch threads {args.threads}; no GPU; date {date.today()}")
    print(f"- stage 1 (train_tiny recipe), batch {args.batch}, {args.codec} cache of {prep['images']} real "
          f"photos (512 px JPEG); ~{s['cached']['tokens']:.0f} LLM tokens per sample; {args.rounds} rounds x "
          f"{args.steps} timed steps per mode (+{args.warmup} warm-up each); wall time {wall:.0f} s\n")
    print(flops_table(flops) + "\n")
    print(timing_table(s, args.batch) + "\n")
    print(ratio_table(s))


def run(args: argparse.Namespace, work: str) -> None:
    t0 = time.perf_counter()
    prep = prepare(work, args)
    flops = spawn(work, args, "flops", "0")
    runs = []
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            runs.append(spawn(work, args, mode, str(r)))
            print(f"round {r} {mode}: median step {statistics.median(runs[-1]['step_s']):.3f} s", file=sys.stderr)
    report(args, prep, flops, runs, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    for k, v in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(k, v)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = child_flops(args) if args.child == "flops" else child_run(args)
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
    sys.exit(main())
