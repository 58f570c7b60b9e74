"""Model loads a person can read: transformers' key-by-key load report held back, one line instead.

transformers 5 logs a table of every checkpoint key a ``from_pretrained`` did not use, did not
find or could not fit (its "LOAD REPORT", a WARNING of the ``transformers.modeling_utils``
logger). Loading the vision tower of a full checkpoint is what this project does on purpose
(``CLIPVisionModel`` from ``openai/clip-vit-large-patch14-336``, a ``CLIPModel`` checkpoint;
``SamVisionModel`` from a ``SamModel``), so every Ray actor and every training process printed
~25 lines of "UNEXPECTED" text-tower keys. The loaders (``pipeline.teachers.hf.load_hf``,
``student.llava.load_vision_tower``) read the same facts from ``output_loading_info=True`` and
judge them themselves:

- ``held_load_report()`` holds transformers' report back while the load runs (a filter on that
  one logger: nothing is patched and its other warnings pass). When the load raises, the report
  is printed after all; ``release()`` prints it when the loader's own check fails (missing or
  mismatched weights): nothing transformers said about a bad load is lost.
- ``dropped_weights_note`` is the one line a loader logs instead for an expected drop, through
  the ``LOAD_NOTES`` logger with ``extra=NOTE``, so a runner can collect the notes of its workers
  (``held_load_notes``) and say them once.

Stdlib only: it lives in the lowest package both loaders may import (jobs -> {pipeline, student}
-> cache), like ``cache.diskfull``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

TRANSFORMERS_LOADER = "transformers.modeling_utils"  # the logger of transformers' LOAD REPORT
LOAD_NOTES = "movekd.load"  # the logger of the loaders' one-line notes
NOTE = {"movekd_load_note": True}  # ``extra=`` that marks a record as a load note


class HeldRecords(list):
    """Log records held back; ``release()`` emits them as they would have been."""

    def release(self) -> None:
        for record in self:
            logging.getLogger(record.name).handle(record)
        self.clear()

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self]


@contextmanager
def held_records(logger: str, hold: Callable[[logging.LogRecord], bool]) -> Iterator[HeldRecords]:
    """Inside the block, records logged on ``logger`` (that logger itself, not its children) for
    which ``hold(record)`` is true are kept in the yielded list instead of being emitted."""
    held = HeldRecords()

    def keep(record: logging.LogRecord) -> bool:
        if hold(record):
            held.append(record)
            return False
        return True

    target = logging.getLogger(logger)
    target.addFilter(keep)
    try:
        yield held
    finally:
        target.removeFilter(keep)


@contextmanager
def held_load_notes() -> Iterator[HeldRecords]:
    """``held_records`` of the loaders' one-line notes (a runner collects its workers' notes).
    The notes are INFO records: the logger is enabled for them inside the block, so they are held
    even where logging is not configured (a Ray worker's root logger stops at WARNING)."""
    notes = logging.getLogger(LOAD_NOTES)
    level = notes.level
    if not notes.isEnabledFor(logging.INFO):
        notes.setLevel(logging.INFO)
    try:
        with held_records(LOAD_NOTES, lambda r: getattr(r, "movekd_load_note", False) is True) as held:
            yield held
    finally:
        notes.setLevel(level)


@contextmanager
def held_load_report() -> Iterator[HeldRecords]:
    """Hold transformers' LOAD REPORT of the loads inside the block; printed if the block raises.
    Call ``release()`` on the yielded list after the block to print it anyway."""
    try:
        with held_records(TRANSFORMERS_LOADER, lambda r: "LOAD REPORT" in str(r.msg)) as held:
            yield held
    except BaseException:
        held.release()  # the filter is off again: the report reaches transformers' handler
        raise


def _parts(keys: Iterable[str]) -> str:
    """``text_model.* (193), logit_scale, text_projection``: keys grouped by their first part."""
    counts = Counter(k.split(".", 1)[0] for k in keys)
    singles = {k.split(".", 1)[0]: k for k in keys}
    return ", ".join(f"{p}.* ({n})" if n > 1 else singles[p] for p, n in sorted(counts.items(), key=lambda x: -x[1]))


def dropped_weights_note(
    who: str,
    loaded: str,
    source: str,
    unexpected: Iterable[str],
    checkpoint: str | None,
    output_only: Iterable[str] = (),
) -> str:
    """One line for an expected drop: ``clip: loaded CLIPVisionModel from SRC (a CLIPModel
    checkpoint); dropped its 196 other weights (text_model.* (193), ...), which a vision encoder
    does not use``. ``output_only``: weights the checkpoint lacks that feed no hidden
    state (a pooler, a head), left at their random init."""
    keys, absent = sorted(unexpected), sorted(output_only)
    line = f"{who}: loaded {loaded} from {source}"
    if keys:
        line += f" (a {checkpoint or 'fuller'} checkpoint); dropped its {len(keys)} other weights ({_parts(keys)}), "
        line += "which a vision encoder does not use"
    if absent:
        line += f"; {len(absent)} pooled-output weights it lacks ({_parts(absent)}) stay at random init (unused)"
    return line
