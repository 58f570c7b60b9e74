"""Quality of lossy targets: the ``train_tiny`` run trained from caches of one dataset that differ
only in the codec, side by side (KD and text loss per step, and their distance to the reference).

Setup (everything in-process, CPU, no network; see ``bench/train_setup.py``):
- Data: ``--images`` distinct real-photo crops (``bench.photo_pack``, 512 px JPEGs with a
  stage-1 caption each), packed into shards of 16.
- Teachers: the ``tiny`` extraction preset (random-weight CLIP / EVA-02 / ConvNeXt / SAM), with
  ConvNeXt's last stage and SAM's neck widened to 64 / 32 channels so int4 (groups of 32
  channels) applies to every teacher (``train_setup.tiny_teachers``). One
  cache per codec, written by ``ShardExtractor``; the teachers run once per cache, and on CPU
  their outputs are bit-identical between caches, so the caches differ only by the codec.
- Training: the ``train_tiny`` preset (tiny student, batch 4, lr 1e-3 with warmup + cosine,
  seed 0), ``num_workers=0``, full preset length unless ``--max-steps``. Every run gets a fresh
  ``build_training`` with the same seed: same initial weights, same batch order. The batch
  order is checked (image keys of every collated batch must match the reference run's).
- Reference: the first codec of ``--codecs`` (default bf16). "max rel. diff" is
  max over steps of |L_codec - L_ref| / |L_ref|. CPU training is fp32 and deterministic, so two
  runs from the same cache give identical losses: every difference is the codec's.
- Target error: rel. MSE = sum (x_hat - x)^2 / sum x^2 of each cache's stored targets against a
  direct fp32 teacher forward on the same images (all images, the no-image row excluded).

Run: ``.venv/bin/python bench/bench_lossy_targets.py [--codecs bf16 fp16 int8 int4]
[--images 32] [--max-steps N] [--every 5] [--png bench/results/lossy_targets_loss_curves.png]``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_setup import extract_cache, machine, photo_pack, tiny_teachers, tiny_train_config  # noqa: E402

DEFAULT_PNG = Path(__file__).resolve().parent / "results" / "lossy_targets_loss_curves.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--codecs",
        nargs="+",
        default=None,
        help="cache codecs to train from; the first is the reference (default: bf16 fp16 int8 "
        "int4, plus ecsq where that codec is registered)",
    )
    p.add_argument("--images", type=int, default=32, help="distinct photo crops in the dataset (default 32)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop each run after N steps (default: the preset's 10 epochs)"
    )
    p.add_argument("--every", type=int, default=5, help="print every N-th step in the per-step table (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--png", default=str(DEFAULT_PNG), help=f"loss-curve plot (default {DEFAULT_PNG})")
    p.add_argument("--workdir", help="keep data/caches/runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.codecs is None:
        from cache import list_codecs

        args.codecs = ["bf16", "fp16", "int8", "int4"] + [c for c in ("ecsq",) if c in list_codecs()]
    return args


def target_fidelity(packed_dir: str, caches: dict[str, str], teachers: list) -> dict[str, dict[str, tuple]]:
    """Per codec and teacher: (rel. MSE, <x_hat - x, x> / <x, x>) of the cached targets against a
    direct fp32 forward; the second number is the error's projection on the target (negative:
    the codec shrinks the targets, which lowers a squared-error loss against them)."""
    import torch
    from PIL import Image

    from cache import open_cache
    from cache.preprocess import preprocess_image
    from pipeline.packed_dataset import PackedDataset
    from pipeline.teachers import build_teacher

    packed = PackedDataset(packed_dir)
    images = {k: Image.open(io.BytesIO(b)) for s in range(packed.num_shards) for k, b, _ in packed.iter_shard(s)}
    keys = sorted(images)
    exact = {}
    for spec in teachers:
        teacher = build_teacher(spec)
        pixels = np.stack([preprocess_image(images[k], teacher.preprocess_spec) for k in keys])
        exact[spec.name] = teacher.encode(torch.from_numpy(pixels)).tokens.numpy()
    out = {}
    for codec, path in caches.items():
        stored = open_cache(path).read(keys).features
        out[codec] = {
            n: (float(((stored[n] - x) ** 2).sum() / (x**2).sum()), float(((stored[n] - x) * x).sum() / (x**2).sum()))
            for n, x in exact.items()
        }
    return out


def train_run(cfg) -> tuple[list[dict], list[tuple[str, ...]]]:
    """Train ``cfg`` from scratch; returns the per-step log records and the key tuple of every batch."""
    from jobs.train import Dist, build_training
    from student.logging_utils import read_jsonl

    trainer, _ = build_training(cfg, Dist())
    seen: list[tuple[str, ...]] = []
    collate = trainer.collate_fn

    def recording_collate(samples):
        batch = collate(samples)
        seen.append(tuple(batch["keys"]))
        return batch

    trainer.collate_fn = recording_collate
    trainer.train()
    return read_jsonl(trainer.log_path), seen


def rel_diff(values: list[float], ref: list[float]) -> np.ndarray:
    a, b = np.asarray(values, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


def series(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records]


def step_table(runs: dict[str, list[dict]], every: int) -> str:
    codecs = list(runs)
    head = ["step"] + [f"KD {c}" for c in codecs] + [f"text {c}" for c in codecs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    n = len(runs[codecs[0]])
    for i in range(n):
        if (i + 1) % every and i not in (0, n - 1):
            continue
        row = [str(runs[codecs[0]][i]["step"])]
        row += [f"{runs[c][i]['loss/kd']:.5f}" for c in codecs] + [f"{runs[c][i]['loss/text']:.5f}" for c in codecs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_table(runs: dict[str, list[dict]]) -> str:
    codecs = list(runs)
    ref = runs[codecs[0]]
    head = [
        "codec",
        "max rel. diff KD",
        "mean rel. diff KD",
        "mean signed rel. diff KD",
        "max rel. diff text",
        "final KD",
        "final text",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for c in codecs:
        kd, ref_kd = np.asarray(series(runs[c], "loss/kd")), np.asarray(series(ref, "loss/kd"))
        diff = rel_diff(kd, ref_kd)
        text = rel_diff(series(runs[c], "loss/text"), series(ref, "loss/text"))
        label = f"{c} (reference)" if c == codecs[0] else c
        row = [
            label,
            f"{diff.max():.2e}",
            f"{diff.mean():.2e}",
            f"{np.mean((kd - ref_kd) / ref_kd):+.2e}",
            f"{text.max():.2e}",
            f"{runs[c][-1]['loss/kd']:.5f}",
            f"{runs[c][-1]['loss/text']:.5f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def fidelity_table(fidelity: dict[str, dict[str, tuple]]) -> str:
    teachers = list(next(iter(fidelity.values())))
    lines = ["| codec | " + " | ".join(teachers) + " |", "|---|" + "---:|" * len(teachers)]
    for c, per in fidelity.items():
        lines.append(f"| {c} | " + " | ".join(f"{per[t][0]:.1e} ({100 * per[t][1]:+.2f} %)" for t in teachers) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codecs = list(runs)
    ref = runs[codecs[0]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, c in enumerate(codecs):
        steps = series(runs[c], "step")
        style = dict(lw=1.4, ls="-" if i == 0 else "--", color=f"C{i}")
        axes[0].plot(steps, series(runs[c], "loss/kd"), label=c, **style)
        axes[1].plot(steps, series(runs[c], "loss/text"), label=c, **style)
        if c != codecs[0]:
            d = rel_diff(series(runs[c], "loss/kd"), series(ref, "loss/kd"))
            axes[2].semilogy(steps, np.maximum(d, 1e-9), label=c, lw=1.4, color=f"C{i}")
    titles = ("KD loss", "text loss", f"KD loss: |L - L_{codecs[0]}| / L_{codecs[0]}")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("train_tiny from caches of the same data, one per codec (same seed, same batches)")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, work: str) -> None:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    teachers = tiny_teachers(os.path.join(work, "tiny-teachers"))
    packed, data_json = photo_pack(os.path.join(work, "data"), args.images)
    caches = {
        c: extract_cache(packed, os.path.join(work, f"cache-{c}"), teachers, c, batch_size=4) for c in args.codecs
    }
    fidelity = target_fidelity(packed, caches, teachers)
    runs, batches = {}, {}
    for c in args.codecs:
        out = os.path.join(work, f"run-{c}")
        shutil.rmtree(out, ignore_errors=True)  # a kept --workdir: always train from scratch
        cfg = tiny_train_config(
            os.path.join(work, "tiny-student"),
            cache=caches[c],
            image_root=packed,
            data_json=data_json,
            output_dir=out,
            num_workers=0,
            max_steps=args.max_steps,
            plot=False,
            progress_bar=False,
            save_every=10**6,
        )
        runs[c], batches[c] = train_run(cfg)
    ref = args.codecs[0]
    for c in args.codecs[1:]:
        if batches[c] != batches[ref]:
            raise SystemExit(f"run {c} saw other batches than {ref}: the comparison would be meaningless")
    plot(runs, args.png)
    print(f"# Lossy targets: train_tiny from {', '.join(args.codecs)} caches\n")
    print(f"- command: `{' '.join(['.venv/bin/python bench/bench_lossy_targets.py', *sys.argv[1:]])}`")
    print(f"- machine: {machine()}; torch threads {args.threads}; date {date.today()}")
    print(
        f"- {len(runs[ref])} steps x batch 4 over {args.images} photo crops; identical batch order "
        f"in every run (checked: {len(batches[ref])} batches); wall time {time.perf_counter() - t0:.0f} s"
    )
    print(f"- plot: {args.png}\n")
    print(summary_table(runs))
    print(
        "\nStored targets vs a direct fp32 teacher forward: rel. MSE (projection of the error on the "
        "target, <x_hat - x, x> / <x, x>):\n"
    )
    print(fidelity_table(fidelity))
    print(f"\nPer step (every {args.every}th, plus first and last):\n")
    print(step_table(runs, args.every))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-lossy-") as work:
            run(args, work)
    return 0


if __name__ == "__main__":
    from movekd_compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # an entry point: before anything imports timm/transformers
    sys.exit(main())
