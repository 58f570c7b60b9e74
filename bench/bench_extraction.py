"""Extraction throughput: the whole per-shard pipeline against the bare teacher forward.

Both sides use the same loaded teachers in one process, on the same machine, in one run:

- pipeline: ``ShardExtractor.process`` over every packed shard (read the tar shard, decode and
  preprocess in ``decode_threads`` threads a few batches ahead, teachers, quantise, compress,
  write whole zarr shards, commit), exactly what a Ray actor runs, minus Ray.
- bare: ``Teacher.encode`` of every teacher on the same images, already decoded, preprocessed
  and stacked into batches in memory (the forward the pipeline wraps, cls attention included).

The machine is shared and its load changes within tens of seconds, so the two sides are paired
finely: for every shard, one pipeline run of the shard and one bare run of the same images, back
to back, the order alternating pair by pair; the ratio is taken per pair and the median of all
pairs reported (``--reps`` passes over all shards). A pipeline run pays, once per shard, the
first batch's decode before any teacher can start (the prefetch restarts per shard): 1 batch in
``shard_size / batch_size`` here, 1 in 125 with the production 1000-image shards; it shows up as
``wait_for_decode``. Stage times are the worker's own ``stage_seconds``; ``read + other`` is the
run's wall time minus the stages the main thread times (tar shard read, batch stacking, cls
copies). ``decode_preprocess`` is thread time spent in the background, overlapped with the
teachers, so it is not part of the wall-time sum. ``CPU s/img`` is this process's CPU time per
image (all threads): what the pipeline adds on top of the forward.

Teachers are random-weight (seeded) but real architectures at CPU-realistic sizes: a CLIP
ViT-S/14-sized ``CLIPVisionModel`` and a timm ConvNeXt (``convnext_tiny`` by default), built,
saved and loaded through ``build_teacher`` like any checkpoint. Random weights cost the same
FLOPs as trained ones; only the int8 codec's output statistics differ, which do not change the
work done.

Run: ``.venv/bin/python bench/bench_extraction.py [--images 64] [--reps 2] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.photo_pack import pack_photos  # noqa: E402
from cache.preprocess import preprocess_image  # noqa: E402
from pipeline.extract import plan  # noqa: E402
from pipeline.extract_config import ExtractConfig  # noqa: E402
from pipeline.extract_worker import ShardExtractor  # noqa: E402
from pipeline.teachers import TeacherSpec  # noqa: E402

MAIN_THREAD_STAGES = ("wait_for_decode", "quantise", "write")


def make_teachers(out_dir: str, args) -> tuple[TeacherSpec, ...]:
    """Save a CLIP ViT (HF) and a timm ConvNeXt with seeded random weights; return their specs."""
    import timm
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    h = args.clip_hidden
    cfg = CLIPVisionConfig(
        hidden_size=h,
        intermediate_size=4 * h,
        num_hidden_layers=args.clip_layers,
        num_attention_heads=h // 64,
        image_size=args.clip_res,
        patch_size=14,
    )
    clip_dir = os.path.join(out_dir, "clip")
    CLIPVisionModel(cfg).eval().save_pretrained(clip_dir)
    convnext = timm.create_model(args.convnext_arch, pretrained=False).eval()
    conv_path = os.path.join(out_dir, "convnext.safetensors")
    save_file({k: v.contiguous() for k, v in convnext.state_dict().items()}, conv_path)
    return (
        TeacherSpec(name="clip", family="clip", source=clip_dir),
        TeacherSpec(
            name="convnext", family="convnext", source=conv_path, arch=args.convnext_arch, resolution=args.convnext_res
        ),
    )


def gflops_per_image(teacher) -> float:
    """Forward FLOPs of one image through ``Teacher.encode`` (torch's FLOP counter), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    r = teacher.preprocess_spec.resolution
    with FlopCounterMode(display=False) as counter:
        teacher.encode(torch.zeros(1, 3, r, r))
    return counter.get_total_flops() / 1e9


def preprocessed_batches(worker: ShardExtractor, packed, shard: int, batch: int) -> list[dict[int, np.ndarray]]:
    """The images of ``shard`` decoded and preprocessed per distinct spec, stacked in batches."""
    import io

    members = list(packed.iter_shard(shard))
    out = []
    for i in range(0, len(members), batch):
        arrays = {sid: [] for sid in worker.pre_specs.values()}
        for _, data, _ in members[i : i + batch]:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                for spec, sid in worker.pre_specs.items():
                    arrays[sid].append(preprocess_image(img, spec))
        out.append({sid: np.stack(a) for sid, a in arrays.items()})
    return out


def bare_side(worker: ShardExtractor, batches) -> dict:
    """``Teacher.encode`` of every teacher over in-memory batches."""
    times = {name: 0.0 for name in worker.teachers}
    cpu0, t0 = time.process_time(), time.perf_counter()
    for pixels in batches:
        for name, teacher in worker.teachers.items():
            x = torch.from_numpy(pixels[worker.pre_specs[teacher.preprocess_spec]])
            t = time.perf_counter()
            teacher.encode(x)
            times[name] += time.perf_counter() - t
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0, "teachers": times}


def pipeline_side(worker: ShardExtractor, shard: int) -> dict:
    """``ShardExtractor.process`` of one shard (bound to the run's plan), with its stage times."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = worker.process(shard)
    wall = time.perf_counter() - t0
    if summary["failed"]:
        raise RuntimeError(f"shard {shard}: images failed: {summary['failed']}")
    stages = dict(summary["stage_seconds"])
    timed = sum(v for k, v in stages.items() if k in MAIN_THREAD_STAGES or k.startswith("teacher/"))
    stages["read + other"] = wall - timed
    return {"wall": wall, "cpu": time.process_time() - cpu0, "stages": stages}


def build(args, work: str):
    packed, _ = pack_photos(os.path.join(work, "data"), args.images, args.image_size, args.shard_size)
    specs = make_teachers(os.path.join(work, "teachers"), args)
    cfg = ExtractConfig(
        packed=packed.root,
        out=os.path.join(work, "cache"),
        teachers=specs,
        codec=args.codec,
        batch_size=args.batch_size,
        device="cpu",
        decode_threads=args.decode_threads,
        prefetch_batches=args.prefetch_batches,
        progress=False,
    )
    worker = ShardExtractor(cfg, torch_threads=args.torch_threads)
    worker.bind(plan(cfg, worker.describe(), packed).manifest)  # the public plan both runners use
    return packed, worker


def run(args, work: str) -> dict:
    """Pairs (pipeline, bare) on the same shard, back to back, order alternating pair by pair."""
    torch.set_num_threads(args.torch_threads)
    packed, worker = build(args, work)
    batches = {s: preprocessed_batches(worker, packed, s, args.batch_size) for s in range(packed.num_shards)}
    info = {
        name: {
            "gflops": gflops_per_image(t),
            "grid": t.grid,
            "channels": t.channels,
            "resolution": t.preprocess_spec.resolution,
            "params_m": sum(p.numel() for p in t.model.parameters()) / 1e6,
        }
        for name, t in worker.teachers.items()
    }
    worker.process(packed.num_shards)  # warm-up: the no-image row runs every stage once
    bare_side(worker, batches[0][:1])
    pairs, load = [], [os.getloadavg()[0]]
    for r in range(args.reps):
        for shard in range(packed.num_shards):
            first = "pipeline" if len(pairs) % 2 == 0 else "bare"
            pair = {"shard": shard, "images": len(packed.keys_in_shard(shard)), "first": first}
            for side in (first, "bare" if first == "pipeline" else "pipeline"):
                pair[side] = pipeline_side(worker, shard) if side == "pipeline" else bare_side(worker, batches[shard])
            pairs.append(pair)
            print(
                f"pass {r} shard {shard}: pipeline {pair['pipeline']['wall']:.1f}s, bare {pair['bare']['wall']:.1f}s",
                file=sys.stderr,
            )
        load.append(os.getloadavg()[0])
    return {"teachers": info, "pairs": pairs, "loadavg_1min": load, "args": vars(args)}


# -- tables ------------------------------------------------------------------------------------
def med(values) -> float:
    return statistics.median(list(values))


def setup_table(res: dict) -> str:
    lines = [
        "| teacher | architecture | input px | tokens x channels | params (M) | GFLOP/img |",
        "|---|---|---:|---|---:|---:|",
    ]
    a = res["args"]
    arch = {
        "clip": f"CLIPVisionModel hidden {a['clip_hidden']}, {a['clip_layers']} layers, patch 14",
        "convnext": f"timm {a['convnext_arch']}, stage-4 output",
    }
    for name, t in res["teachers"].items():
        g = t["grid"]
        lines.append(
            f"| {name} | {arch[name]} | {t['resolution']} | {g[0]}x{g[1]}={g[0] * g[1]} x {t['channels']} "
            f"| {t['params_m']:.1f} | {t['gflops']:.2f} |"
        )
    return "\n".join(lines)


def ratio_table(res: dict) -> str:
    """Per-pair ratios (median, quartiles, range) and the totals over all pairs."""
    pairs = res["pairs"]
    ratios = sorted(p["bare"]["wall"] / p["pipeline"]["wall"] for p in pairs)
    cpu = sorted(p["bare"]["cpu"] / p["pipeline"]["cpu"] for p in pairs)
    n = sum(p["images"] for p in pairs)
    tot = {side: sum(p[side]["wall"] for p in pairs) for side in ("pipeline", "bare")}
    cpu_tot = {side: sum(p[side]["cpu"] for p in pairs) for side in ("pipeline", "bare")}
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return (
        "| measure | pipeline | bare forward | pipeline / bare |\n|---|---:|---:|---:|\n"
        f"| img/s, pair median ({len(pairs)} pairs) | {med(p['images'] / p['pipeline']['wall'] for p in pairs):.2f} "
        f"| {med(p['images'] / p['bare']['wall'] for p in pairs):.2f} | **{med(ratios):.3f}** "
        f"(quartiles {q[0]:.3f}-{q[2]:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}) |\n"
        f"| img/s, all pairs pooled ({n} images each side) | {n / tot['pipeline']:.2f} | {n / tot['bare']:.2f} "
        f"| {tot['bare'] / tot['pipeline']:.3f} |\n"
        f"| process CPU s/img (all threads), pooled | {cpu_tot['pipeline'] / n:.3f} | {cpu_tot['bare'] / n:.3f} "
        f"| {cpu_tot['bare'] / cpu_tot['pipeline']:.3f} (pair median {med(cpu):.3f}) |"
    )


def stage_table(res: dict) -> str:
    """Each stage pooled over all pairs, in ms per image, with its share of the pipeline's wall time."""
    pairs = res["pairs"]
    n = sum(p["images"] for p in pairs)
    wall = sum(p["pipeline"]["wall"] for p in pairs)
    names = ["read + other", "wait_for_decode"] + [f"teacher/{t}" for t in res["teachers"]] + ["quantise", "write"]
    lines = ["| stage | pipeline ms/img | share of pipeline wall | bare forward ms/img |", "|---|---:|---:|---:|"]
    for name in names:
        v = sum(p["pipeline"]["stages"].get(name, 0.0) for p in pairs)
        bare = ""
        if name.startswith("teacher/"):
            bare = f"{1e3 * sum(p['bare']['teachers'][name[8:]] for p in pairs) / n:.1f}"
        lines.append(f"| {name} | {1e3 * v / n:.1f} | {100 * v / wall:.1f}% | {bare} |")
    bare_wall = sum(p["bare"]["wall"] for p in pairs)
    lines.append(f"| **wall** | **{1e3 * wall / n:.1f}** | 100% | **{1e3 * bare_wall / n:.1f}** |")
    dp = sum(p["pipeline"]["stages"].get("decode_preprocess", 0.0) for p in pairs)
    lines.append(f"| decode_preprocess (thread time in the background, overlapped) | {1e3 * dp / n:.1f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64, help="images in the pack (default 64)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=16,
        help="images per packed/cache shard = per pair (default 16; production packs use 1000)",
    )
    p.add_argument("--image-size", type=int, default=512, help="side of the JPEGs in px (default 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--prefetch-batches", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--codec", default="int8")
    p.add_argument("--clip-hidden", type=int, default=384, help="CLIP width (heads = width / 64); default 384")
    p.add_argument("--clip-layers", type=int, default=12)
    p.add_argument("--clip-res", type=int, default=224, help="CLIP input px (patch 14); default 224 -> 16x16")
    p.add_argument("--convnext-arch", default="convnext_tiny", help="timm ConvNeXt architecture")
    p.add_argument("--convnext-res", type=int, default=320, help="ConvNeXt input px (default 320 -> 10x10)")
    p.add_argument("--reps", type=int, default=2, help="passes over all shards (default 2)")
    p.add_argument("--workdir", help="keep the pack, teachers and cache here (default: a temp dir)")
    p.add_argument("--json", help="also write the raw measurements to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        res = run(args, args.workdir or tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=list))
    a = res["args"]
    print(
        f"{a['images']} images ({a['image_size']} px JPEG) in shards of {a['shard_size']}, "
        f"batch {a['batch_size']}, torch threads {a['torch_threads']}, "
        f"decode threads {a['decode_threads']}, codec {a['codec']}, "
        f"{os.cpu_count()} CPUs; 1-min load average during the run: "
        f"{', '.join(f'{x:.1f}' for x in res['loadavg_1min'])}\n"
    )
    print("### Teachers\n\n" + setup_table(res) + "\n")
    print("### Pipeline vs bare forward (pairs on the same shard, back to back)\n\n" + ratio_table(res) + "\n")
    print("### Where the pipeline's time goes (all pairs pooled)\n\n" + stage_table(res))


if __name__ == "__main__":
    from movekd_compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # an entry point: before anything imports timm/transformers
    main()
