"""Distillation data: LLaVA conversation rows joined to their cached teacher features.

``DistillDataset`` takes abstract inputs (``ConversationRecord``s, a ``key -> PIL image`` loader,
an open ``FeatureCache``), so student/ never touches the packed image format; ``jobs.image_source``
builds those inputs from a ``movekd pack`` directory.

Decisions:
- The cache is the contract. The constructor refuses, with a message naming what to do: a cache
  with uncommitted shards, requested teachers it lacks, no CLS teacher when attention-guided KD
  needs one, an image-token count different from the CLS teacher's grid, a missing "no image"
  row when text-only rows exist, image keys the cache has never seen (a different pack), and a
  student ``PreprocessSpec`` that differs from the CLS teacher's in any field (a ``square``
  stage-1 cache used for the ``pad`` stage 2, say; ``aspect`` is also checked against every
  requested teacher, since it is the stage's identity).
- Rows are dropped at construction, never at access time, so the sampler sees a fixed length:
  images marked failed in the cache, conversations ``render`` rejects, and rows
  ``ConversationTooLong`` refuses. The pre-check is exact and mostly cheap, in three tiers:
  every row is rendered (string work, ~40 us); a row whose upper bound (BOS + sentinels + one
  token per UTF-8 byte, plus one per piece) fits ``max_length`` is kept; the others get their
  exact ``len(input_ids)`` from one batched tokenizer call per 1024 rows (no offsets, no label
  pass), and only rows still over ``max_length`` -- the ones ``tokenize_conversation`` will
  truncate -- are fully tokenised to learn whether it refuses them. Drops are counted per reason
  with a few examples in ``skipped`` (and logged).
- ``lengths()`` is LLaVA's measure for length grouping (whitespace words over all turns);
  ``modalities()`` says which rows have an image. Only their relative order matters.
- Kept records live in numpy arrays (conversations as one JSON byte buffer plus offsets; ids,
  sources and keys as fixed-width bytes), not a list of dicts: forked DataLoader workers share
  them without copy-on-write refcount churn (the growth LLaVA's ``list_data_dict`` causes at
  665K rows). Records are decoded on access.
- Text-only rows read the cache's reserved row (``NULL_KEY``) and get ``null_image_tensor``, the
  released "no image" input (a black image through the student's preprocessing, -mean/std), the
  one the teachers saw for that row (docs/method.md §3.1). A cache whose manifest says its row
  holds another input (``null_input: zeros``, format 1) is refused, naming the one-row fix.
- Rows with an image but no ``<image>`` in their text are kept, as LLaVA keeps them: the image is
  read (KD and the balance loss apply) but the LLM sees no image tokens (the sample's
  ``has_image``, which tells the model to splice, is False; ``modalities()`` still says image, as
  LLaVA's ``modality_lengths``). They are counted in ``counts`` and logged.
- Several caches of one pack (``cache.multi.CacheUnion``, ``TrainConfig.cache`` as a list) are
  read as one: each member is checked as a single cache is (complete, black no-image row), each
  teacher's preprocessing against the cache that supplies it, only the caches that supply a read
  teacher (or the CLS) decide validity, a key failed in one is skipped and counted as
  ``invalid_image`` with that cache named, and a key missing from one is an error saying which
  cache lacks how many keys.
- Batched reads: ``read_batch(indices)`` reads every row of a batch with one ``FeatureCache.read``
  (zarr fetches the chunks concurrently). It is also ``__getitems__``, which a map-style
  ``DataLoader`` with ``batch_size`` calls instead of ``__getitem__`` per index, so the usual
  ``DataLoader(ds, batch_size=B, sampler=..., collate_fn=collate_distill)`` already batches
  reads, in worker processes too.
- ``encoded_targets=True`` (``TrainConfig.target_decode: device``): samples carry the cache's
  stored components instead of float32 ``targets``, ``encoded_targets = {teacher: {"codec": name,
  "parts": {component: tensor}}}`` (views of the batch's read, no per-sample copy), which
  ``collate_distill`` stacks; ``student.target_decode.decode_batch_targets`` dequantises them
  on the training device, bit-identical to the host decode. 4x fewer bytes per sample through
  the workers, pinning and the copy (BENCHMARKS.md, loading).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cache import NULL_KEY, FeatureCache, PreprocessSpec
from cache.multi import CacheUnion
from cache.preprocess import null_image_tensor, preprocess_image
from student.conversation import (
    IMAGE_PLACEHOLDER,
    ConversationTooLong,
    get_template,
    has_placeholder,
    render,
    tokenize_conversation,
)
from student.llava import collate
from student.target_decode import ENCODED_KEY

log = logging.getLogger(__name__)

INVALID_IMAGE = "invalid_image"
INVALID_CONVERSATION = "invalid_conversation"
TOO_LONG = "too_long"
IMAGE_WITHOUT_PLACEHOLDER = "image_without_placeholder"  # kept, counted
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ConversationRecord:
    """One LLaVA JSON row: where it came from, its turns, and its image key (None: text-only)."""

    row_id: str
    source: str
    row_index: int
    conversations: Sequence[Mapping[str, Any]]
    image_key: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source} row {self.row_index} (id {self.row_id})"


class SkipLog:
    """Skipped rows per reason: a count and the first few examples (for logs and run reports)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(example)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {r: {"count": n, "examples": list(self._examples[r])} for r, n in sorted(self._counts.items())}


class _RecordTable:
    """Records packed into numpy arrays (see module docstring); ``record(i)`` rebuilds one."""

    def __init__(self, records: Sequence[ConversationRecord]) -> None:
        blobs = [json.dumps(list(r.conversations), ensure_ascii=False).encode() for r in records]
        self._offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self._sources = sorted({r.source for r in records})
        where = {s: i for i, s in enumerate(self._sources)}
        self._source = np.array([where[r.source] for r in records], dtype=np.int32)
        self._row = np.array([r.row_index for r in records], dtype=np.int64)
        self._ids = _bytes_array([str(r.row_id).encode() for r in records])
        self._keys = _bytes_array([(r.image_key or "").encode() for r in records])

    def __len__(self) -> int:
        return len(self._row)

    def record(self, i: int) -> ConversationRecord:
        conv = json.loads(self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes())
        key = self._keys[i].decode() or None
        return ConversationRecord(self._ids[i].decode(), self._sources[self._source[i]], int(self._row[i]), conv, key)


def _bytes_array(items: list[bytes]) -> np.ndarray:
    return np.array(items, dtype=f"S{max((len(b) for b in items), default=1) or 1}")


def check_preprocess(student: PreprocessSpec, cache_spec: PreprocessSpec, where: str) -> None:
    """Raise ``ValueError`` naming every field where the student's preprocessing differs."""
    diffs = [
        (f.name, getattr(student, f.name), getattr(cache_spec, f.name))
        for f in dataclasses.fields(PreprocessSpec)
        if getattr(student, f.name) != getattr(cache_spec, f.name)
    ]
    if diffs:
        lines = "; ".join(f"preprocess.{n}: student={a!r}, cache={b!r}" for n, a, b in diffs)
        raise ValueError(
            f"the student's preprocessing differs from {where}: {lines}. The student must see the "
            "pixels the teachers saw: use the cache extracted for this stage (stage 1 'square', "
            "stage 2 'pad') or set the student's PreprocessSpec to the cache's."
        )


def _parts(cache: FeatureCache | CacheUnion) -> tuple[FeatureCache, ...]:
    return cache.parts if isinstance(cache, CacheUnion) else (cache,)


def _url_of(cache: FeatureCache | CacheUnion, teacher: str) -> str:
    """The cache that supplies ``teacher`` (a union's member), for messages."""
    return (cache.part_of(teacher) if isinstance(cache, CacheUnion) else cache).location.url


def _check_complete(cache: FeatureCache) -> None:
    m, url = cache.manifest, cache.location.url
    if m.null_input != "black":
        raise ValueError(
            f"cache {url} has the old no-image row (null_input={m.null_input!r}, format {m.format_version}), "
            "not the released black input: rewrite only that row with `movekd extract --config <its extraction "
            "config> --rewrite-null-row` (cache/FORMAT.md section 2)"
        )
    if not cache.complete:
        missing = m.num_shards - len(cache.committed_shards)
        raise ValueError(
            f"cache {url} has {missing} of {m.num_shards} shards uncommitted (not written yet, or the "
            f"extraction was interrupted); finish it with `movekd extract` (it resumes), then check "
            f"it with `movekd cache verify {url}`"
        )


def check_cache(
    cache: FeatureCache | CacheUnion, preprocess: PreprocessSpec, teachers: Sequence[str] | None, require_cls: bool
) -> tuple[str, ...]:
    """Validate ``cache`` (one, or a ``CacheUnion``: each member is checked, and each teacher's
    preprocessing against the cache that supplies it) for distillation (module docstring); return
    the teachers to read."""
    m, url = cache.manifest, cache.location.url
    for part in _parts(cache):
        _check_complete(part)
    names = tuple(m.teacher_names if teachers is None else teachers)
    unknown = [t for t in names if t not in m.teacher_names]
    if unknown or not names:
        raise ValueError(f"teacher(s) {unknown or names!r} requested, but cache {url} holds {list(m.teacher_names)}")
    if m.cls_teacher is None:
        if require_cls:
            raise ValueError(
                f"cache {url} has no cls teacher (manifest cls_teacher is None), but attention-guided "
                "KD needs the CLIP teacher's CLS state and attention: re-extract with cls_teacher set, "
                "or use token_weighting='uniform' and teacher_weighting='fixed' with require_cls=False"
            )
    else:
        where = f"cache {_url_of(cache, m.cls_teacher)} (teacher {m.cls_teacher!r})"
        check_preprocess(preprocess, m.teacher(m.cls_teacher).preprocess, where)
    for name in names:
        aspect = m.teacher(name).preprocess.aspect
        if aspect != preprocess.aspect:
            raise ValueError(
                f"preprocess.aspect: student={preprocess.aspect!r}, cache {_url_of(cache, name)} teacher "
                f"{name!r}={aspect!r}; use the cache extracted for this stage"
            )
    return names


def _image_tokens(cache: FeatureCache, requested: int | None) -> int:
    m = cache.manifest
    cls_tokens = m.teacher(m.cls_teacher).tokens if m.cls_teacher is not None else None
    if requested is None:
        if cls_tokens is None:
            raise ValueError(
                f"cache {cache.location.url} has no cls teacher: pass num_image_tokens (the student's patch count)"
            )
        return cls_tokens
    if cls_tokens is not None and requested != cls_tokens:
        raise ValueError(
            f"num_image_tokens={requested}, but the cls teacher {m.cls_teacher!r} of "
            f"{cache.location.url} has {cls_tokens} tokens: the student's patch grid "
            "must match the CLIP teacher's"
        )
    return requested


def _byte_bound(prompt: str) -> int:
    """Upper bound on ``len(input_ids)``: BOS, one sentinel per ``<image>``, and per piece at most
    one token per UTF-8 byte plus one (a SentencePiece prefix space)."""
    pieces = [p for p in prompt.split(IMAGE_PLACEHOLDER) if p]
    return 1 + prompt.count(IMAGE_PLACEHOLDER) + sum(len(p.encode("utf-8")) + 1 for p in pieces)


def _splices_image(rec: ConversationRecord) -> bool:
    """Whether the row's image tokens go into the LLM: it has an image and an ``<image>``."""
    return rec.image_key is not None and has_placeholder(rec.conversations)


def _word_length(conversations: Sequence[Mapping[str, Any]]) -> int:
    """LLaVA's ``lengths``/``modality_lengths`` measure: whitespace words over every turn."""
    return sum(len(str(t.get("value", "")).split()) for t in conversations if isinstance(t, Mapping))


class DistillDataset(torch.utils.data.Dataset):
    """Tokenised rows + student pixels + dequantised cached teacher targets (module docstring)."""

    def __init__(
        self,
        records: Sequence[ConversationRecord],
        image_loader: Callable[[str], Image.Image],
        cache: FeatureCache,
        tokenizer,
        *,
        preprocess: PreprocessSpec,
        template: str = "vicuna_v1",
        teachers: Sequence[str] | None = None,
        max_length: int = 2048,
        num_image_tokens: int | None = None,
        require_cls: bool = True,
        encoded_targets: bool = False,
    ) -> None:
        self.cache, self.image_loader, self.tokenizer = cache, image_loader, tokenizer
        self.encoded_targets = bool(encoded_targets)
        self.preprocess, self.template = preprocess, get_template(template).name
        self.teachers = check_cache(cache, preprocess, teachers, require_cls)
        if isinstance(cache, CacheUnion):  # only the caches read decide which keys are valid
            self.cache = cache = cache.select(self.teachers)
        self.num_image_tokens = _image_tokens(cache, num_image_tokens)
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.max_length = max_length
        kept, skips = self._precheck(records)
        self._table = _RecordTable(kept)
        self._lengths = np.array([_word_length(r.conversations) for r in kept], dtype=np.int64)
        self._has_image = np.array([r.image_key is not None for r in kept], dtype=bool)
        self.skipped = skips.as_dict()
        self.counts = self._count(kept)
        if self.counts[IMAGE_WITHOUT_PLACEHOLDER]["count"]:
            log.info(
                "DistillDataset: %d image row(s) without %s kept as LLaVA keeps them (KD, no image tokens)",
                self.counts[IMAGE_WITHOUT_PLACEHOLDER]["count"],
                IMAGE_PLACEHOLDER,
            )
        if skips.total:
            log.info(
                "DistillDataset: kept %d of %d rows; skipped %s",
                len(kept),
                len(records),
                {r: s["count"] for r, s in self.skipped.items()},
            )

    # -- construction ----------------------------------------------------------------------
    def _count(self, kept: Sequence[ConversationRecord]) -> dict[str, Any]:
        """Kept rows by kind; ``image_without_placeholder`` with a few examples (the data report)."""
        without = SkipLog()
        for rec in kept:
            if rec.image_key is not None and not _splices_image(rec):
                without.add(IMAGE_WITHOUT_PLACEHOLDER, f"{rec.where}: image {rec.image_key!r}")
        return {
            "rows": len(kept),
            "rows_with_image": int(self._has_image.sum()),
            "rows_text_only": int((~self._has_image).sum()),
            IMAGE_WITHOUT_PLACEHOLDER: without.as_dict().get(IMAGE_WITHOUT_PLACEHOLDER, {"count": 0, "examples": []}),
        }

    def _precheck(self, records: Sequence[ConversationRecord]) -> tuple[list[ConversationRecord], SkipLog]:
        skips, failed, unknown, rendered = SkipLog(), self.cache.failed(), [], []
        for rec in records:
            key = rec.image_key
            if key is not None and key not in self.cache:
                unknown.append((rec.where, key))
            elif key is not None and key in failed:
                skips.add(INVALID_IMAGE, f"{rec.where}: image {key!r}: {failed[key]}")
            else:
                try:
                    rendered.append((rec, self._render(rec)))
                except ValueError as e:
                    skips.add(INVALID_CONVERSATION, f"{rec.where}: {e}")
        self._check_lookups(unknown, any(rec.image_key is None for rec, _ in rendered))
        refused = self._refuse_too_long(rendered, skips)
        return [rec for j, (rec, _) in enumerate(rendered) if j not in refused], skips

    def _render(self, rec: ConversationRecord) -> str:
        if isinstance(rec.conversations, (str, bytes)) or not isinstance(rec.conversations, Sequence):
            raise ValueError("'conversations' is not a list of turns")
        return render(rec.conversations, self.template, rec.image_key is not None, row_id=rec.row_id)[0]

    def _refuse_too_long(self, rendered: list[tuple[ConversationRecord, str]], skips: SkipLog) -> set[int]:
        """Positions in ``rendered`` that ``tokenize_conversation`` refuses: byte bound first, then
        a batched token count of the pieces, and only rows over both are fully tokenised."""
        maybe = [
            j for j, (rec, prompt) in enumerate(rendered) if self._spliced(rec, _byte_bound(prompt)) > self.max_length
        ]
        refused: set[int] = set()
        for start in range(0, len(maybe), 1024):
            chunk = maybe[start : start + 1024]
            for j, n in zip(chunk, self._token_counts([rendered[j][1] for j in chunk])):
                rec = rendered[j][0]
                if self._spliced(rec, n) <= self.max_length:
                    continue
                try:
                    self._tokenize(rec)
                except ConversationTooLong as e:
                    skips.add(TOO_LONG, f"{rec.where}: {e}")
                    refused.add(j)
                except ValueError as e:
                    skips.add(INVALID_CONVERSATION, f"{rec.where}: {e}")
                    refused.add(j)
        return refused

    def _spliced(self, rec: ConversationRecord, ids: int) -> int:
        return ids + (self.num_image_tokens - 1 if _splices_image(rec) else 0)

    def _token_counts(self, prompts: list[str]) -> list[int]:
        """``len(input_ids)`` as ``encode_prompt`` builds it (BOS, each piece tokenised alone, one
        sentinel per ``<image>``), from one batched tokenizer call without offsets."""
        pieces = [[p for p in prompt.split(IMAGE_PLACEHOLDER) if p] for prompt in prompts]
        flat = [p for ps in pieces for p in ps]
        ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out, k = [], 0
        for prompt, ps in zip(prompts, pieces):
            out.append(1 + prompt.count(IMAGE_PLACEHOLDER) + sum(len(x) for x in ids[k : k + len(ps)]))
            k += len(ps)
        return out

    def _check_lookups(self, unknown: list[tuple[str, str]], any_text_only: bool) -> None:
        m, url = self.cache.manifest, self.cache.location.url
        if unknown and isinstance(self.cache, CacheUnion):
            raise ValueError(
                f"{len(unknown)} row(s) use image keys missing from some of the caches {url}: "
                f"{self.cache.missing_report(k for _, k in unknown)}; every cache must hold every image of the pack "
                f"(fingerprint {m.dataset_fingerprint}): finish or re-extract the lacking cache with "
                "`movekd extract` on this pack"
            )
        if unknown:
            examples = [f"{where}: {key!r}" for where, key in unknown[:3]]
            raise ValueError(
                f"{len(unknown)} row(s) use image keys that cache {url} does not hold, e.g. "
                f"{examples}: the cache was extracted from a different pack (cache dataset "
                f"{m.dataset_name!r}, fingerprint {m.dataset_fingerprint}); use the pack it was "
                "built from, or extract a cache for this pack with `movekd extract`"
            )
        if any_text_only and NULL_KEY not in self.cache:
            raise ValueError(
                f"cache {url} has no committed 'no image' row ({NULL_KEY!r}) but the data has "
                "text-only rows; finish the cache with `movekd extract` (it writes that row)"
            )

    # -- access --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def lengths(self) -> list[int]:
        """Per row, LLaVA's text length estimate (words); for length-grouped sampling."""
        return self._lengths.tolist()

    def modalities(self) -> list[bool]:
        """Per row, whether it has an image (False: text-only)."""
        return self._has_image.tolist()

    def record(self, i: int) -> ConversationRecord:
        return self._table.record(self._check_index(i))

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a DistillDataset of {len(self)} rows")
        return i

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.read_batch([i])[0]

    def read_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Samples for ``indices``, with all their cache rows read in one ``FeatureCache.read``."""
        records = [self.record(i) for i in indices]
        keys = [r.image_key if r.image_key is not None else NULL_KEY for r in records]
        rows = self.cache.read(keys, self.teachers, decode=not self.encoded_targets)
        return [self._sample(rec, key, rows, j) for j, (rec, key) in enumerate(zip(records, keys))]

    __getitems__ = read_batch

    def _tokenize(self, rec: ConversationRecord) -> dict[str, torch.Tensor]:
        return tokenize_conversation(
            rec.conversations,
            self.tokenizer,
            self.template,
            has_image=rec.image_key is not None,
            max_length=self.max_length,
            num_image_tokens=self.num_image_tokens,
            row_id=rec.row_id,
        )

    def _pixels(self, rec: ConversationRecord) -> np.ndarray:
        if rec.image_key is None:
            return null_image_tensor(self.preprocess)
        try:
            image = self.image_loader(rec.image_key)
        except Exception as e:  # noqa: BLE001 - loaders raise OSError, PIL errors, KeyError...
            raise ValueError(f"{rec.where}: cannot load image {rec.image_key!r}: {e}") from e
        return preprocess_image(image, self.preprocess)

    def _sample(self, rec: ConversationRecord, key: str, rows, j: int) -> dict[str, Any]:
        try:
            text = self._tokenize(rec)
        except ValueError as e:
            raise ValueError(
                f"{rec.where} passed the construction pre-check but failed now (was the "
                f"tokenizer or max_length changed after construction?): {e}"
            ) from e
        sample = {
            **text,
            "pixel_values": torch.from_numpy(self._pixels(rec)),
            "has_image": _splices_image(rec),  # image tokens in the LLM (not for a row without <image>)
            "key": key,
        }
        if self.encoded_targets:
            sample[ENCODED_KEY] = {t: self._encoded(t, rows.features[t], j) for t in self.teachers}
        else:
            sample["targets"] = {t: torch.from_numpy(np.array(rows.features[t][j])) for t in self.teachers}
        if rows.cls_state is not None:
            sample["cls_state"] = torch.from_numpy(np.array(rows.cls_state[j]))
            sample["cls_attn"] = torch.from_numpy(np.array(rows.cls_attn[j]))
        return sample

    def _encoded(self, teacher: str, parts: Mapping[str, np.ndarray], j: int) -> dict[str, Any]:
        codec = self.cache.manifest.teacher(teacher).codec
        return {"codec": codec, "parts": {c: torch.from_numpy(arr[j]) for c, arr in parts.items()}}


def collate_distill(samples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """``student.llava.collate`` for the text (right padding, attention mask, IGNORE labels) and
    pixels; stacks ``targets`` per teacher (``[B, N, C]``) or, from ``encoded_targets=True``
    samples, ``encoded_targets`` per teacher and component; ``cls_state``/``cls_attn`` when every
    sample has them; keeps ``keys`` as a list."""
    batch = collate(samples, pad_token_id)
    key = ENCODED_KEY if ENCODED_KEY in samples[0] else "targets"
    teachers = list(samples[0][key])
    if any(list(s.get(key, ())) != teachers for s in samples):
        raise ValueError(f"collate_distill: samples hold different teachers (first has {key} of {teachers})")
    if key == "targets":
        batch["targets"] = {t: torch.stack([s["targets"][t] for s in samples]) for t in teachers}
    else:
        batch[ENCODED_KEY] = {t: _stack_encoded([s[ENCODED_KEY][t] for s in samples]) for t in teachers}
    for name in ("cls_state", "cls_attn"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    batch["keys"] = [s["key"] for s in samples]
    return batch


def _stack_encoded(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    codec = entries[0]["codec"]
    if any(e["codec"] != codec for e in entries):
        codecs = sorted({e["codec"] for e in entries})
        raise ValueError(f"collate_distill: samples hold targets of different codecs ({codecs})")
    return {"codec": codec, "parts": {c: torch.stack([e["parts"][c] for e in entries]) for c in entries[0]["parts"]}}


__all__ = [
    "ConversationRecord",
    "DistillDataset",
    "SkipLog",
    "check_cache",
    "check_preprocess",
    "collate_distill",
    "INVALID_CONVERSATION",
    "IMAGE_WITHOUT_PLACEHOLDER",
    "INVALID_IMAGE",
    "TOO_LONG",
]
