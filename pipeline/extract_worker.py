"""One extraction worker: all teachers loaded once, turning input shard i into cache shard i.

Decisions:
- The worker streams its shard: images are decoded and preprocessed (once per distinct
  preprocessing among the teachers) in a thread pool a few batches ahead of the teachers, so
  decode overlaps compute (PIL and torch both release the GIL).
- Features are quantised batch by batch (on the GPU when there is one) and only the encoded arrays
  are kept, so a shard never exists as float32 in memory; it is then written and committed whole.
- A bad image (undecodable, truncated, a teacher output with NaN/Inf) is recorded in the shard's
  commit marker with its reason and its row is marked invalid; it never fails the shard.
- This class is plain Python; ``pipeline.extract`` wraps it in a Ray actor. It returns only a
  small summary (feature tensors never travel through Ray's object store).
- What loading dropped from a checkpoint (``cache.load_report``: a CLIPModel's text tower) is
  kept as ``load_notes()`` instead of being logged by every actor: the runner says it once.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from cache.codecs import NonFiniteError, get_codec
from cache.load_report import held_load_notes
from cache.manifest import CacheManifest, PreprocessSpec
from cache.marker import NULL_KEY
from cache.preprocess import null_image_tensor, preprocess_image
from cache.writer import CacheWriter, ShardCommittedError
from pipeline.extract_config import ExtractConfig
from pipeline.packed_dataset import PackedDataset
from pipeline.teachers import build_teacher
from pipeline.torch_codecs import encode_torch

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ShardExtractor:
    """Loads every teacher once; ``process(shard)`` writes and commits one cache shard."""

    def __init__(self, cfg: ExtractConfig, worker_id: int = 0, torch_threads: int | None = None):
        self.cfg, self.worker_id = cfg, worker_id
        self.device = resolve_device(cfg.device)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        with held_load_notes() as notes:
            self.teachers = {s.name: build_teacher(s, device=self.device) for s in cfg.teachers}
        self._load_notes = notes.messages()
        specs = {}
        for t in self.teachers.values():
            specs.setdefault(t.preprocess_spec, len(specs))
        self.pre_specs: dict[PreprocessSpec, int] = specs
        self.packed = PackedDataset(cfg.packed)
        self._writer: CacheWriter | None = None

    def describe(self) -> list[dict]:
        """The manifest entries of the loaded teachers (the driver builds the manifest from these)."""
        return [t.manifest_entry(self.cfg.codec_for(n)).to_dict() for n, t in self.teachers.items()]

    def load_notes(self) -> list[str]:
        """One line per teacher whose checkpoint held weights it does not use (what was dropped)."""
        return list(self._load_notes)

    def pid(self) -> int:
        return os.getpid()

    def bind(self, manifest: CacheManifest | dict) -> None:
        """Take the run's manifest (``pipeline.extract.plan``) once, before any ``process``."""
        if isinstance(manifest, dict):
            manifest = CacheManifest.from_dict(manifest)
        self._writer = CacheWriter.open(self.cfg.out, manifest)

    def use_writer(self, writer: CacheWriter) -> None:
        """Write through ``writer`` (already opened and checked, e.g. ``pipeline.extract_null``)."""
        self._writer = writer

    # -- one shard ---------------------------------------------------------------------------
    def process(self, shard: int, replace: bool = False) -> dict:
        """Extract, write and commit cache shard ``shard``; returns a small summary.

        A shard found committed (by another driver) is not computed again: the summary then says
        ``by_other`` with the marker's writer. ``replace`` (a repair) rewrites it anyway."""
        if self._writer is None:
            raise RuntimeError("ShardExtractor.process before bind(manifest): make a plan first (pipeline.extract)")
        writer, manifest = self._writer, self._writer.manifest
        if not replace and (done := writer.valid_commit(shard)) is not None:
            return {"shard": shard, "by_other": done.writer or "another driver"}
        t0 = time.perf_counter()
        times: dict[str, float] = defaultdict(float)
        if shard == manifest.num_shards:
            keys, failed, enc, cls = self._null_row(times)
        else:
            keys, failed, enc, cls = self._run_shard(shard, times)
        t_write = time.perf_counter()
        try:
            writer.write_encoded(shard, keys, enc, *cls, failed=failed, replace=replace)
        except ShardCommittedError:  # another driver committed it while this one computed
            done = writer.valid_commit(shard)
            return {"shard": shard, "by_other": (done.writer if done else "") or "another driver"}
        times["write"] += time.perf_counter() - t_write
        total = time.perf_counter() - t0
        return {
            "shard": shard,
            "images": len(keys),
            "failed": failed,
            "seconds": total,
            "stage_seconds": dict(times),
            "worker": self.worker_id,
            "pid": os.getpid(),
        }

    def _run_shard(self, shard: int, times: dict):
        return self.compute(list(self.packed.iter_shard(shard)), times)

    def compute(self, members: list[tuple[str, bytes, dict]], times: dict | None = None):
        """What extraction stores for ``members`` (``(key, image_bytes, meta)``, e.g. from
        ``PackedDataset.iter_shard`` or ``read_images``), without writing anything: ``(keys,
        failed, encoded, (cls_state, cls_attn))``, ``encoded[teacher][component]`` in row order.
        ``process`` writes exactly this; the recompute check (``pipeline.recompute``) compares it."""
        times = defaultdict(float) if times is None else times
        keys = [m[0] for m in members]
        failed: dict[str, str] = {}
        acc = _Accumulator(self.teachers, self.cfg)
        for batch in self._batches(members, times):
            bkeys = [b[0] for b in batch]
            for key, _, err in batch:
                if err:
                    failed[key] = err
            pixels = {sid: np.stack([b[1][sid] for b in batch]) for sid in self.pre_specs.values()}
            acc.add(bkeys, pixels, self.pre_specs, failed, times, self.device)
        return keys, failed, acc.encoded(), acc.cls()

    def compute_null(self, times: dict | None = None):
        """``compute`` for the reserved no-image row: ``([NULL_KEY], {}, encoded, cls)``."""
        return self._null_row(defaultdict(float) if times is None else times)

    def _null_row(self, times: dict):
        """The reserved no-image row: every teacher on ``null_image_tensor`` (the released black
        input through that teacher's own preprocessing; the manifest says ``null_input``)."""
        pixels = {sid: null_image_tensor(spec)[None] for spec, sid in self.pre_specs.items()}
        acc = _Accumulator(self.teachers, self.cfg)
        failed: dict[str, str] = {}
        acc.add([NULL_KEY], pixels, self.pre_specs, failed, times, self.device)
        if failed:
            raise RuntimeError(f"the no-image input produced invalid teacher outputs: {failed}")
        return [NULL_KEY], failed, acc.encoded(), acc.cls()

    def _batches(self, members, times) -> Iterator[list]:
        """Decoded+preprocessed members in order, ``prefetch_batches`` batches ahead."""
        size = self.cfg.batch_size
        chunks = [members[i : i + size] for i in range(0, len(members), size)]
        with ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="decode") as pool:
            pending: deque = deque()
            for chunk in chunks[: self.cfg.prefetch_batches]:
                pending.append([pool.submit(self._load, m) for m in chunk])
            for i in range(len(chunks)):
                t = time.perf_counter()
                batch = [f.result() for f in pending.popleft()]
                times["wait_for_decode"] += time.perf_counter() - t
                times["decode_preprocess"] += sum(b[3] for b in batch)
                nxt = i + self.cfg.prefetch_batches
                if nxt < len(chunks):
                    pending.append([pool.submit(self._load, m) for m in chunks[nxt]])
                yield [b[:3] for b in batch]

    def _load(self, member) -> tuple[str, dict[int, np.ndarray], str | None, float]:
        key, data, _meta = member
        t = time.perf_counter()
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                out = {sid: preprocess_image(img, spec) for spec, sid in self.pre_specs.items()}
            return key, out, None, time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - any undecodable image is recorded, never fatal
            # a placeholder only: the row is marked failed and stored as zeros
            zeros = {
                sid: np.zeros((3, spec.resolution, spec.resolution), np.float32) for spec, sid in self.pre_specs.items()
            }
            return key, zeros, f"cannot decode image: {type(e).__name__}: {e}", time.perf_counter() - t


def _encode_on(codec: str, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Quantise where the tokens are: torch kernels on a GPU (only encoded bytes cross to the
    host), numpy on the CPU, where it measured 1.5-7x faster. Both are bit-identical."""
    if tokens.device.type == "cuda":
        return encode_torch(codec, tokens)
    return get_codec(codec).encode(tokens.float().numpy())


class _Accumulator:
    """Runs the teachers on batches and keeps their quantised outputs. On a GPU quantisation runs
    on the device (``pipeline.torch_codecs``): only the encoded arrays reach the host."""

    def __init__(self, teachers: dict, cfg: ExtractConfig):
        self.teachers, self.cfg = teachers, cfg
        self.parts: dict[str, dict[str, list]] = {n: defaultdict(list) for n in teachers}
        self.cls_state: list = []
        self.cls_attn: list = []

    def add(self, keys, pixels, pre_specs, failed, times, device) -> None:
        for name, teacher in self.teachers.items():
            x = torch.from_numpy(pixels[pre_specs[teacher.preprocess_spec]]).to(device)
            t = time.perf_counter()
            out = teacher.encode(x)
            self._synchronize(out.tokens)  # CUDA runs ahead: wait, so each stage is timed honestly
            times[f"teacher/{name}"] += time.perf_counter() - t
            t = time.perf_counter()
            for comp, arr in self._encode(name, keys, out.tokens, failed).items():
                self.parts[name][comp].append(arr)
            self._synchronize(out.tokens)
            times["quantise"] += time.perf_counter() - t
            if name == self.cfg.cls_teacher:
                self._keep_cls(name, keys, out, failed)

    def _keep_cls(self, name, keys, out, failed) -> None:
        """The CLS teacher's [CLS] state and attention row; an image whose rows are not finite is
        marked failed like a non-finite feature (the writer stores failed rows as zeros)."""
        state, attn = out.cls_state.float().cpu().numpy(), out.cls_attn.float().cpu().numpy()
        finite = np.isfinite(state).all(axis=1) & np.isfinite(attn).all(axis=1)
        for r in np.flatnonzero(~finite):
            failed.setdefault(keys[r], f"teacher {name} produced NaN/Inf in its [CLS] state or attention")
        self.cls_state.append(state)
        self.cls_attn.append(attn)

    def _encode(self, name, keys, tokens, failed) -> dict[str, np.ndarray]:
        """Quantise on the tokens' device; rows of failed images (and of NaN/Inf outputs, which
        are marked failed here) are zeroed first, so they store zeros."""
        codec = self.cfg.codec_for(name)
        try:
            return _encode_on(codec, self._zero_rows(tokens, [k in failed for k in keys]))
        except NonFiniteError as e:
            for r in e.rows:
                failed.setdefault(keys[r], f"teacher {name} produced NaN/Inf")
        return _encode_on(codec, self._zero_rows(tokens, [k in failed for k in keys]))

    @staticmethod
    def _zero_rows(tokens: torch.Tensor, rows: list[bool]) -> torch.Tensor:
        """``tokens`` with the flagged batch rows zeroed, out of place (teacher outputs are
        inference tensors)."""
        if not any(rows):
            return tokens
        return tokens.masked_fill(torch.tensor(rows, device=tokens.device)[:, None, None], 0.0)

    @staticmethod
    def _synchronize(t: torch.Tensor) -> None:
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)

    def encoded(self) -> dict[str, dict[str, np.ndarray]]:
        return {n: {c: np.concatenate(v) for c, v in parts.items()} for n, parts in self.parts.items()}

    def cls(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.cls_state:
            return None, None
        return np.concatenate(self.cls_state), np.concatenate(self.cls_attn)
