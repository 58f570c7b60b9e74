"""``movekd demo --out DIR``: the whole pipeline on the bundled sample, end to end, on CPU.

Stages (each a real command's code path, each resumable): build the sample dataset from real
photos shipped in scikit-image/scikit-learn/matplotlib -> pack it into WebDataset shards ->
extract tiny random-weight teachers with Ray into a feature cache -> verify and inspect the cache
-> draw one [CLS] attention heatmap over its photo -> train a tiny MoLE student (stage 1) from the
cache for a few steps and export it -> answer the sample's tiny question set with it and score the
answers (a random tiny model scores near zero: the point is that the path runs). Everything lands
under DIR; rerunning reuses what is done.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("movekd.demo")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the bundled sample data",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--out", required=True, help="directory for everything the demo writes (created)")
    p.add_argument("--codec", default="int8", help="cache codec preset for every teacher (default: int8)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=4,
        help="images per packed/cache shard (small, so the sample spans several shards; default 4)",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray extraction actors (default 2)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=6,
        help="optimizer steps of the tiny stage-1 training run (0 skips training; default 6)",
    )
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=run)


def _stage(name: str):
    log.info("== %s", name)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from cache import open_cache, verify_cache
    from cache.cli import main as cache_main
    from jobs.config import load_config
    from jobs.image_source import PackedImageSource
    from jobs.train import main as train_main
    from pipeline.extract import run_extraction, summarize
    from pipeline.packing import format_summary, pack_dataset
    from pipeline.sample_data import build_sample

    out = os.path.abspath(args.out)
    progress = not args.no_progress
    t = _stage("1/6 sample dataset (real photos shipped in scikit-image, scikit-learn, matplotlib)")
    sample = build_sample(os.path.join(out, "sample"))
    t = _stage(f"2/6 pack ({time.perf_counter() - t:.1f}s)")
    packed_dir = os.path.join(out, "packed")
    result = pack_dataset(
        sample["json"], sample["image_root"], packed_dir, shard_size=args.shard_size, workers=2, progress=progress
    )
    print(format_summary(result))
    t = _stage(f"3/6 extract with tiny teachers on local Ray ({time.perf_counter() - t:.1f}s)")
    cfg = load_config(
        "tiny",
        {
            "packed": packed_dir,
            "out": os.path.join(out, "cache"),
            "codec": args.codec,
            "num_workers": args.workers,
            "tiny_teachers.dir": os.path.join(out, "tiny-teachers"),
            "progress": progress,
        },
    )
    report = run_extraction(cfg)
    print(summarize(report))
    if not report.ok:
        return 1
    t = _stage(f"4/6 verify and inspect the cache ({time.perf_counter() - t:.1f}s)")
    cache_dir = os.path.join(out, "cache")
    verdict = verify_cache(cache_dir, progress=progress)
    if not verdict.ok:
        print("\n".join(verdict.problems), file=sys.stderr)
        return 1
    cache_main(["inspect", cache_dir])
    key = next(k for k in open_cache(cache_dir).keys() if not k.startswith("__"))
    png = os.path.join(out, f"attn-{key}.png")
    photo = os.path.join(out, f"photo-{key}")
    with open(photo, "wb") as f:
        f.write(PackedImageSource(packed_dir).read_bytes(key))
    cache_main(["attn", cache_dir, key, "--out", png, "--image", photo])
    if args.train_steps > 0:
        t = _stage(f"5/6 train a tiny MoLE student from the cache ({time.perf_counter() - t:.1f}s)")
        code = train_main(
            [
                "--config",
                "train_tiny",
                "--max-steps",
                str(args.train_steps),
                "--set",
                f"cache={cache_dir}",
                "--set",
                f"image_root={packed_dir}",
                "--set",
                f"data_json={sample['json'][0]}",
                "--set",
                f"output_dir={out}/train",
                "--set",
                f"tiny_student.dir={out}/tiny-student",
                "--set",
                f"progress_bar={str(progress).lower()}",
            ]
        )
        if code:
            return code
        t = _stage(
            f"6/6 ask the trained student the sample's questions and score them ({time.perf_counter() - t:.1f}s)"
        )
        from jobs.cli import main as movekd

        answers = os.path.join(out, "answers.jsonl")
        answer = ["answer", "--model", f"{out}/train/export", "--questions", sample["eval"]]
        answer += ["--image-folder", sample["image_root"], "--out", answers, "--max-new-tokens", "8"]
        code = movekd(answer) or movekd(["evaluate", "--questions", sample["eval"], "--answers", answers])
        if code:
            return code
    print(
        f"\ndemo finished in {out}: cache verified, attention heatmap in {png}"
        + (
            f", student trained, exported under {out}/train and evaluated ({out}/answers.jsonl)"
            if args.train_steps > 0
            else ""
        )
    )
    return 0
