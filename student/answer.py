"""Answer a LLaVA-format question file, as LLaVA's ``model_vqa_loader.py`` does, resumably.

Input lines: ``{"question_id", "image" (optional), "text", "category" (optional)}``. Output lines:
``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}`` (LLaVA's fields, so
its scoring scripts and the benchmarks' submission converters read the output unchanged).

Decisions:
- Resume: question ids already in the output are skipped; each answer is one complete line
  written and flushed at once, and a torn last line (a crash mid-write) is dropped on reopen
  before appending, so the file only ever holds complete lines.
- Sharding as LLaVA: ``num_chunks``/``chunk_idx`` take the ``chunk_idx``-th of ``num_chunks``
  contiguous, near-equal slices of the question list (LLaVA's ``get_chunk``); ``torchrun`` ranks
  map onto the same slices.
- A malformed question line or an unreadable image is recorded (line number / question id and
  why) and skipped; the run goes on. ``answer_id`` is a uuid4 like LLaVA's ``shortuuid``.
- ``prompt`` holds the question text as LLaVA writes it (with the suffix, before templating).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cache.manifest import PreprocessSpec
from student.generate import GenerationConfig, generate

# The per-benchmark answer suffixes of LLaVA's eval scripts (scripts/v1_5/eval/*.sh).
SUFFIXES = {
    "short": "Answer the question using a single word or phrase.",
    "option": "Answer with the option's letter from the given choices directly.",
    "pope": "Answer the question using a single word or phrase.",
    "none": "",
}


@dataclass
class AnswerSummary:
    """What one ``answer_file`` run did."""

    answered: int = 0
    skipped: int = 0  # already in the output
    failed: list[str] = field(default_factory=list)  # "line N: why" / "question Q: why"

    def format(self) -> str:
        lines = [f"answered {self.answered}, skipped {self.skipped} (already answered), failed {len(self.failed)}"]
        lines += [f"  {f}" for f in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more")
        return "\n".join(lines)


def read_questions(path, failed: list[str]) -> list[dict]:
    """Valid question records of a jsonl file; malformed lines are appended to ``failed``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                failed.append(f"{path} line {n}: not JSON ({e.msg})")
                continue
            problem = _question_problem(rec)
            if problem:
                failed.append(f"{path} line {n}: {problem}")
                continue
            out.append(rec)
    return out


def _question_problem(rec) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    if "question_id" not in rec:
        return "no 'question_id'"
    if not isinstance(rec.get("text"), str):
        return "no 'text' string"
    if rec.get("image") is not None and not isinstance(rec["image"], str):
        return "'image' is not a path string"
    return None


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's ``split_list``/``get_chunk``: ``ceil(len/num_chunks)``-sized contiguous slices."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in [0, num_chunks), got {chunk_idx} of {num_chunks}")
    size = math.ceil(len(items) / num_chunks) if items else 0
    return list(items[chunk_idx * size : (chunk_idx + 1) * size]) if size else []


def answered_ids(out_path) -> set:
    """Question ids already answered in ``out_path``; a torn (partial) last line is cut off."""
    path = Path(out_path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    ids = set()
    for line in keep.decode("utf-8").splitlines():
        if line.strip():
            ids.add(json.loads(line)["question_id"])
    return ids


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def load_image(folder, rel: str) -> Image.Image:
    path = os.path.join(folder, rel)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path} cannot be decoded ({e})") from None


def answer_file(
    model,
    tokenizer,
    questions_path,
    image_folder,
    out_path,
    preprocess: PreprocessSpec,
    template: str = "vicuna_v1",
    suffix: str = "",
    config: GenerationConfig | None = None,
    model_id: str = "movekd",
    num_chunks: int = 1,
    chunk_idx: int = 0,
    batch_size: int = 8,
    progress=None,
) -> AnswerSummary:
    """Answer every not-yet-answered question of this chunk; append LLaVA-format lines to ``out_path``."""
    summary = AnswerSummary()
    todo = get_chunk(read_questions(questions_path, summary.failed), num_chunks, chunk_idx)
    done = answered_ids(out_path)
    summary.skipped = sum(q["question_id"] in done for q in todo)
    todo = [q for q in todo if q["question_id"] not in done]
    if progress is not None:
        progress.reset(total=len(todo))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as out:
        for batch in _batches(todo, max(1, batch_size)):
            ready, images = [], []
            for q in batch:
                try:
                    images.append(load_image(image_folder, q["image"]) if q.get("image") else None)
                    ready.append(q)
                except ValueError as e:
                    summary.failed.append(f"question {q['question_id']}: {e}")
            prompts = [(q["text"] + ("\n" + suffix if suffix else "")).strip() for q in ready]
            answers = generate(model, tokenizer, prompts, images, preprocess, template, config) if ready else []
            for q, prompt, text in zip(ready, prompts, answers):
                line = {
                    "question_id": q["question_id"],
                    "prompt": prompt,
                    "text": text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": {},
                }
                out.write(json.dumps(line) + "\n")
                out.flush()
                summary.answered += 1
            if progress is not None:
                progress.update(len(batch))
    return summary
