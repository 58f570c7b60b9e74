"""Training data path throughput at the real MoVE-KD v1.0 shapes, against what a training step eats.

Loading side: ``DistillDataset`` + ``DataLoader(batch_size=B, collate_fn=collate_distill)`` with
0, 1 and 2 worker processes, reading a cache with the v1.0 teachers at their real shapes (clip
576 x 1024 with [CLS] state and attention row, eva 4096 x 1024, convnext 1024 x 3072; int8,
synthetic values, see ``bench/loading_data.py``), real photo JPEGs from a ``movekd pack``
directory (decoded and preprocessed to the student's 336 px) and stage-1 captions tokenised with
the tiny byte-level BPE tokenizer (the Vicuna tokenizer is not available offline). One sample
delivers ~31.7 MB of float32 targets. samples/s is the steady rate: samples after the first
max(1, workers) batches over the time since those arrived (worker start excluded); for the short
library-reader passes it is the whole pass instead.
``cache MB/s`` counts the bytes stored on disk (zstd-compressed int8 + scales) the reads pull;
the cache was just written, so they come from the page cache, not the disk.

Consuming side: one optimizer step of the ``train_tiny`` preset (tiny MoLE CLIP 56 px, 2-layer
Llama; ``jobs.train.build_training``) on a cache of the ``tiny`` extraction preset's teachers,
timed on batches loaded beforehand (compute only: forward, backward, clip, AdamW; median of
``--train-steps``), measured again right before every loader pass so that each loading/consumption
ratio is taken side by side (the machine is shared). The trainer's own logged ``images_per_s``
(which also includes its in-loop loading and checkpoint saves) is shown for reference.

Two cache readers: ``library`` is the reader ``FeatureCache.read_rows`` had when this benchmark was
written (zarr orthogonal selection with an integer row array), swapped in for the whole process and
its forked workers; ``slices`` is ``FeatureCache.read_rows`` as shipped now (one basic slice per run
of consecutive rows), adopted from this benchmark's measurements. The library reader
is 20-100x slower per row at these chunk sizes (zarr-python issue #3829), so it gets one short pass
(``--library-samples``) per worker count. With ``slices``, worker counts are measured interleaved
(rotating order) ``--reps`` times; medians are reported.

Two target hand-overs (``--targets``): ``host`` is ``DistillDataset``'s default, float32 targets
dequantised in the loader; ``encoded`` is ``encoded_targets=True`` (``TrainConfig.target_decode:
device``): the stored int8 values + scales go through collate and the worker IPC (~7.9 MB per
sample instead of 31.7 MB) and ``student.target_decode.decode_batch_targets`` dequantises them
after the loader, on the training device. Here that device is the CPU: its cost is timed on a
collated batch (``decode on the device``, one process) and reported next to the loader rate; on
a GPU it is one elementwise pass at memory bandwidth. Both hand-overs are measured in the same
interleaved rotation, so each encoded/host ratio is taken side by side.

Run: ``.venv/bin/python bench/bench_loading.py [--images 128] [--batch-size 16] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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

from bench.loading_data import build_tiny_training, stored_bytes, write_v1_cache  # noqa: E402
from bench.photo_pack import pack_photos  # noqa: E402

STUDENT_PX = 336
READ_BATCH = "read_batch (the parts above, timed again as one call, + per-sample copies)"
DEVICE_DECODE = "decode on the device (decode_batch_targets; CPU here)"


def v1_dataset(cache_dir: str, packed, data_json: str, tokenizer, encoded: bool = False):
    from cache import NULL_KEY, PreprocessSpec, open_cache
    from jobs.image_source import PackedImageSource, records_from_packed
    from student.data import DistillDataset

    cache = open_cache(cache_dir)
    ds = DistillDataset(
        records_from_packed(packed.root, data_json),
        PackedImageSource(packed.root),
        cache,
        tokenizer,
        preprocess=PreprocessSpec(resolution=STUDENT_PX),
        template="plain",
        encoded_targets=encoded,
    )
    rows = len(cache) + (NULL_KEY not in cache)
    return ds, stored_bytes(cache.location.zarr_path) / rows


def read_rows_orthogonal(self, path: str, rows):
    """The reader ``FeatureCache.read_rows`` had before this benchmark: zarr 3.1's integer-array
    (orthogonal) selection, which on sharded arrays routes each chunk through its coordinate
    indexer (zarr-python issue #3829). Kept to compare with the shipped slice-per-run reader."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    arr = self._arrays()[path]
    if rows.size == 0:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    uniq, inverse = np.unique(rows, return_inverse=True)
    return arr.get_orthogonal_selection((uniq,))[inverse]


READERS = {"library": read_rows_orthogonal, "slices": None}  # slices = FeatureCache.read_rows as shipped


@contextlib.contextmanager
def use_reader(name: str):
    """Swap ``FeatureCache.read_rows`` for the named variant (forked DataLoader workers inherit it)."""
    from cache.reader import FeatureCache

    original = FeatureCache.read_rows
    if READERS[name] is not None:
        FeatureCache.read_rows = READERS[name]
    try:
        yield
    finally:
        FeatureCache.read_rows = original


def time_loader(ds, collate, batch: int, workers: int, seed: int, samples: int) -> dict:
    """One pass of ``samples`` random samples through a DataLoader; per-batch arrival times."""
    gen = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=min(samples, len(ds)), generator=gen)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, collate_fn=collate, num_workers=workers)
    t0, arrivals, sizes = time.perf_counter(), [], []
    for b in loader:
        arrivals.append(time.perf_counter() - t0)
        sizes.append(len(b["keys"]))
    skip = min(max(1, workers), len(arrivals) - 1)
    steady = sum(sizes[skip:]) / (arrivals[-1] - arrivals[skip - 1]) if skip else None
    return {"epoch_sps": sum(sizes) / arrivals[-1], "steady_sps": steady, "first_batch_s": arrivals[0]}


def component_costs(ds, collate, batch: int, batches: int) -> dict[str, float]:
    """Seconds per sample of each part of ``read_batch`` + collate (+ the device decode of an
    encoded batch), in this process."""
    from cache import get_codec
    from cache.layout import CLS_ATTN, CLS_STATE, TEACHERS
    from cache.preprocess import preprocess_image
    from student.conversation import tokenize_conversation
    from student.target_decode import decode_batch_targets

    cache, m = ds.cache, ds.cache.manifest
    t = dict.fromkeys(
        [
            "cache: zarr read + zstd",
            "cache: dequantise to float32",
            "image read + decode",
            f"preprocess {STUDENT_PX} px",
            "tokenise",
            READ_BATCH,
            "collate",
            DEVICE_DECODE,
        ],
        0.0,
    )
    n = 0
    for i in range(batches):
        idx = list(range(i * batch, min((i + 1) * batch, len(ds))))
        recs = [ds.record(j) for j in idx]
        rows = [cache.row(r.image_key) for r in recs]
        s = time.perf_counter()
        raw = {
            name: {
                c.name: cache.read_rows(f"{TEACHERS}/{name}/{c.name}", rows)
                for c in get_codec(m.teacher(name).codec).components(m.teacher(name).tokens, m.teacher(name).channels)
            }
            for name in ds.teachers
        }
        cache.read_rows(CLS_STATE, rows), cache.read_rows(CLS_ATTN, rows)
        s2 = time.perf_counter()
        for name, parts in raw.items():
            get_codec(m.teacher(name).codec).decode(parts)
        t["cache: zarr read + zstd"] += s2 - s
        t["cache: dequantise to float32"] += time.perf_counter() - s2
        for r in recs:
            s = time.perf_counter()
            img = ds.image_loader(r.image_key)
            s2 = time.perf_counter()
            preprocess_image(img, ds.preprocess)
            s3 = time.perf_counter()
            tokenize_conversation(
                r.conversations,
                ds.tokenizer,
                ds.template,
                has_image=True,
                max_length=ds.max_length,
                num_image_tokens=ds.num_image_tokens,
            )
            t["image read + decode"] += s2 - s
            t[f"preprocess {STUDENT_PX} px"] += s3 - s2
            t["tokenise"] += time.perf_counter() - s3
        s = time.perf_counter()
        samples = ds.read_batch(idx)
        s2 = time.perf_counter()
        collated = collate(samples)
        s3 = time.perf_counter()
        decode_batch_targets(collated, torch.device("cpu"))
        t[READ_BATCH] += s2 - s
        t["collate"] += s3 - s2
        t[DEVICE_DECODE] += time.perf_counter() - s3
        n += len(idx)
    return {k: v / n for k, v in t.items()}


class TinyConsumer:
    """What one optimizer step of ``train_tiny`` consumes, measurable again next to each loader pass."""

    def __init__(self, trainer, cfg, steps: int) -> None:
        self.trainer, self.cfg, self.steps = trainer, cfg, steps
        trainer.train(stop_after=steps)  # the real loop once, for its logged rate
        with open(trainer.log_path) as f:
            self.logged = [json.loads(line)["images_per_s"] for line in f][1:]  # step 1 pays warm-up
        loader = torch.utils.data.DataLoader(
            trainer.dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=trainer.collate_fn,
            generator=torch.Generator().manual_seed(0),
        )
        self.batches = [b for _, b in zip(range(steps + 1), loader)]
        trainer.model.train()

    def step_seconds(self) -> float:
        """Median compute-only step (forward, backward, clip, AdamW) over the preloaded batches."""
        from student.train_loop import accumulate_window, optimizer_step

        t, times = self.trainer, []
        for b in self.batches:
            s = time.perf_counter()
            accumulate_window(t.module, iter([b]), 1, torch.device("cpu"), False, t.image_tokens)
            optimizer_step(t.optimizer, t.scheduler, t.params, self.cfg.max_grad_norm)
            times.append(time.perf_counter() - s)
        return statistics.median(times[1:])


def run(args, work: str) -> dict:
    from cache import get_codec
    from student.data import collate_distill  # after ensure_torchvision_importable (main)

    torch.set_num_threads(args.torch_threads)
    t = time.perf_counter()
    packed, data_json = pack_photos(os.path.join(work, "data"), args.images, args.image_size, args.shard_size)
    write_v1_cache(os.path.join(work, "v1-cache"), packed)
    print(f"pack + v1 cache written in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    cfg, trainer, tokenizer = build_tiny_training(work, packed, data_json)
    datasets = {
        mode: v1_dataset(os.path.join(work, "v1-cache"), packed, data_json, tokenizer, encoded=mode == "encoded")
        for mode in args.targets
    }
    ds, row_bytes = next(iter(datasets.values()))
    collate = functools.partial(collate_distill, pad_token_id=tokenizer.pad_token_id)
    consumer = TinyConsumer(trainer, cfg, args.train_steps)
    costs, loader = {}, {}
    for reader in args.readers:
        full = reader != "library"
        samples, reps = (args.images, args.reps) if full else (args.library_samples, 1)
        passes = [(mode, w) for mode in args.targets for w in args.workers]
        runs: dict[str, dict[str, list[dict]]] = {mode: {str(w): [] for w in args.workers} for mode in args.targets}
        with use_reader(reader):
            for mode, (mds, _) in datasets.items():
                costs[f"{reader}, {mode}"] = component_costs(mds, collate, args.batch_size, args.component_batches)
            for r in range(reps):
                for mode, w in passes[r % len(passes) :] + passes[: r % len(passes)]:  # rotating order
                    step = consumer.step_seconds()  # measured right before each pass: a paired ratio
                    m = time_loader(datasets[mode][0], collate, args.batch_size, w, seed=r, samples=samples)
                    runs[mode][str(w)].append({**m, "step_s": step, "consume_sps": cfg.batch_size / step})
                    print(
                        f"{reader} {mode} rep {r} workers {w}: {m['epoch_sps']:.1f} samples/s, "
                        f"tiny step {1e3 * step:.0f} ms",
                        file=sys.stderr,
                    )
        for mode in args.targets:
            loader[f"{reader}, {mode}"] = {"reader": reader, "mode": mode, "samples": samples, "runs": runs[mode]}
    m = ds.cache.manifest
    aux_bytes = 4 * (m.teacher(m.cls_teacher).channels + m.teacher(m.cls_teacher).tokens)
    float_bytes = sum(4 * t.tokens * t.channels for t in m.teachers) + aux_bytes
    encoded_bytes = aux_bytes + sum(
        np.dtype(c.dtype).itemsize * int(np.prod(c.shape))
        for t in m.teachers
        for c in get_codec(t.codec).components(t.tokens, t.channels)
    )
    return {
        "args": vars(args),
        "samples": len(ds),
        "row_bytes": row_bytes,
        "float_bytes": float_bytes,
        "delivered_bytes": {"host": float_bytes, "encoded": encoded_bytes},
        "costs": costs,
        "batch": cfg.batch_size,
        "logged_sps": consumer.logged,
        "loader": loader,
        "loadavg_1min": os.getloadavg()[0],
    }


# -- tables ------------------------------------------------------------------------------------
def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def loader_table(res: dict) -> str:
    """Per reader, hand-over and worker count; the consumption ratio is per pass against the tiny
    step measured just before; ``vs host`` is the median rate over the same reader's host rate."""
    mb = 1e6
    lines = [
        "| cache reader | targets | workers | samples x passes | samples/s | vs host | cache MB/s read (stored) "
        "| MB/s delivered | device decode ms/sample (CPU) | tiny step samples/s (paired) | loading / consumption |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    key = {"library": "epoch_sps"}
    for name, info in res["loader"].items():
        reader, mode = info.get("reader", name), info.get("mode", "host")
        host = res["loader"].get(f"{reader}, host")
        decode = res["costs"].get(name, {}).get(DEVICE_DECODE)
        for w, reps in info["runs"].items():
            k = key.get(reader, "steady_sps")
            rate = med(r[k] for r in reps)
            base = med(r[k] for r in host["runs"][w]) if host else None
            x = med(r[k] / r["consume_sps"] for r in reps)
            lines.append(
                f"| {reader} | {mode} | {w} | {info['samples']} x {len(reps)} | {rate:.1f} "
                f"| {'' if base is None else f'{rate / base:.2f}x'} | {rate * res['row_bytes'] / mb:.0f} "
                f"| {rate * res['delivered_bytes'][mode] / mb:.0f} "
                f"| {'-' if mode == 'host' or decode is None else f'{1e3 * decode:.1f}'} "
                f"| {med(r['consume_sps'] for r in reps):.1f} | {x:.3f}x |"
            )
    return "\n".join(lines)


def cost_table(res: dict) -> str:
    readers = list(res["costs"])
    lines = [
        "| part (0 workers, one process) | " + " | ".join(f"{r} ms/sample" for r in readers) + " |",
        "|---|" + "---:|" * len(readers),
    ]
    for k in res["costs"][readers[0]]:
        lines.append(f"| {k} | " + " | ".join(f"{1e3 * res['costs'][r][k]:.1f}" for r in readers) + " |")
    totals = [res["costs"][r][READ_BATCH] + res["costs"][r]["collate"] for r in readers]
    lines.append("| **read_batch + collate** | " + " | ".join(f"**{1e3 * t:.1f}**" for t in totals) + " |")
    return "\n".join(lines)


def consume_table(res: dict) -> str:
    steps = [r["step_s"] for info in res["loader"].values() for reps in info["runs"].values() for r in reps]
    logged = med(res["logged_sps"])
    return (
        "| config | batch | compute-only step ms: median (min-max) over passes | samples/s consumed "
        "| trainer-logged images_per_s |\n|---|---:|---:|---:|---:|\n"
        f"| train_tiny | {res['batch']} | {1e3 * med(steps):.1f} ({1e3 * min(steps):.1f}-{1e3 * max(steps):.1f}) "
        f"| {res['batch'] / med(steps):.1f} | {'n/a' if logged is None else f'{logged:.1f}'} |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=128, help="photos in the pack (default 128)")
    p.add_argument("--image-size", type=int, default=512, help="side of the JPEGs in px (default 512)")
    p.add_argument("--shard-size", type=int, default=64, help="images per packed/cache shard (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="loader batch (default 16, v1.0's per-GPU batch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    p.add_argument("--reps", type=int, default=3, help="passes per worker count with the slices reader")
    p.add_argument(
        "--readers",
        nargs="+",
        default=["library", "slices"],
        choices=sorted(READERS),
        help="cache read_rows variants: library (the earlier zarr orthogonal selection) and "
        "slices (FeatureCache.read_rows as shipped now); default both",
    )
    p.add_argument(
        "--library-samples",
        type=int,
        default=32,
        help="samples per pass with the library reader (one pass each; it is slow); default 32",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        default=["host", "encoded"],
        choices=["host", "encoded"],
        help="target hand-overs: host (float32 from the loader) and encoded (stored components, decoded "
        "after the loader: target_decode=device); default both",
    )
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=12, help="timed steps of the tiny config (default 12)")
    p.add_argument("--component-batches", type=int, default=2, help="batches for the per-part breakdown")
    p.add_argument("--workdir", help="keep pack and caches here (default: a temp dir)")
    p.add_argument("--json", help="also write the raw measurements to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        res = run(args, args.workdir or tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    a = res["args"]
    print(
        f"{res['samples']} samples ({a['image_size']} px JPEG -> {STUDENT_PX} px), batch {a['batch_size']}, "
        f"torch threads {a['torch_threads']}, {os.cpu_count()} CPUs, 1-min load average at the end "
        f"{res['loadavg_1min']:.1f}; per sample: {res['row_bytes'] / 1e6:.2f} MB stored, "
        f"{res['float_bytes'] / 1e6:.1f} MB float32 targets, {res['delivered_bytes']['encoded'] / 1e6:.1f} MB "
        "encoded\n"
    )
    print("### Consumption: one training step of train_tiny\n\n" + consume_table(res) + "\n")
    print("### Loading at the v1.0 shapes (median over reps)\n\n" + loader_table(res) + "\n")
    print("### Where one sample's loading time goes\n\n" + cost_table(res))


if __name__ == "__main__":
    from movekd_compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # an entry point: before anything imports timm/transformers
    main()
