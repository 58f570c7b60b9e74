"""A deterministic, exactly resumable distributed sampler with LLaVA's length grouping.

``DistributedLengthGroupedSampler`` yields this rank's dataset indices for one epoch.

Decisions:
- The order is a pure function of (seed, epoch, lengths, modalities, grouping, batch size, world
  size, rank, drop_last). One ``torch.Generator`` seeded with ``seed + epoch`` drives every shuffle
  (LLaVA passes ``generator=None`` to its inner grouped shuffles, i.e. the global RNG; we do not).
- Groupings follow LLaVA's ``LengthGroupedSampler``: ``"none"`` is a plain permutation (stage 1);
  ``"length"`` is ``get_length_grouped_indices`` (random megabatches of world_size * batch_size
  indices, each sorted by length, longest first, split into world_size chunks of similar total
  length); ``"modality_length"`` is ``get_modality_length_grouped_indices`` (stage 2): image rows
  and text-only rows are grouped separately, their full megabatches shuffled together, and the
  two leftover partial megabatches merged into one last, mixed megabatch.
- Sharding: the global order is padded by wrapping around (or, with ``drop_last``, cut) to a
  multiple of world_size * batch_size, and rank r takes the r-th batch of each megabatch: what
  accelerate's batch sharding does with LLaVA's sampler, so each chunk of a megabatch lands on
  one rank. Every rank gets the same number of samples and only full batches.
- State is ``(epoch, cursor)``, cursor = samples of this rank's epoch order already consumed.
  The sampler never moves the cursor by itself: a DataLoader's workers prefetch batches the model
  has not trained on yet, so counting yielded indices would skip data on resume. The trainer
  calls ``advance(batch_size)`` once per batch it has trained on, before checkpointing, and saves
  ``state_dict()``. ``iter()`` starts at the cursor as of the ``iter()`` call; ``len()`` is what
  that iteration will yield, ``num_samples`` the whole epoch's share.
- ``set_epoch(e)`` resets the cursor only when ``e`` differs from the current epoch, so a loop
  that calls ``set_epoch`` after ``load_state_dict`` resumes mid-epoch instead of restarting.
- The rank's order is computed once per epoch and kept (a few MB at 665K rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

GROUPINGS = ("none", "length", "modality_length")
_STATE_CHECKED = ("seed", "world_size", "batch_size", "grouping", "drop_last", "dataset_size")


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """LLaVA's ``split_to_even_chunks``: greedy fill of the chunk with the smallest total length."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = math.inf
    return chunks


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """LLaVA's ``get_length_grouped_indices`` (positions into ``lengths``)."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    out: list[int] = []
    for start in range(0, len(perm), size):
        mega = sorted(perm[start : start + size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(mega, lengths, world_size):
            out += chunk
    return out


def modality_length_grouped_indices(
    lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """LLaVA's ``get_modality_length_grouped_indices``: image and text-only rows in separate
    megabatches, except one final megabatch holding both leftovers."""
    mm = [i for i, h in enumerate(has_image) if h]
    lang = [i for i, h in enumerate(has_image) if not h]
    if not mm or not lang:
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    size = world_size * batch_size
    megabatches, leftover = [], []
    for group in (mm, lang):
        order = length_grouped_indices([lengths[i] for i in group], batch_size, world_size, generator)
        shuffled = [group[i] for i in order]
        parts = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
        megabatches += parts[:-1]
        leftover += parts[-1]
    perm = torch.randperm(len(megabatches), generator=generator).tolist()
    out = [i for p in perm for i in megabatches[p]]
    return out + sorted(leftover)


class DistributedLengthGroupedSampler(Sampler[int]):
    """This rank's indices for one epoch, starting at the cursor (see the module docstring)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        modalities: Sequence[bool] | None = None,
        grouping: str = "none",
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        _check_args(len(lengths), batch_size, grouping, world_size, rank)
        if grouping == "modality_length":
            if modalities is None or len(modalities) != len(lengths):
                raise ValueError(
                    "grouping='modality_length' needs modalities (has_image per row) "
                    f"of the same length as lengths ({len(lengths)})"
                )
        self.lengths = [int(n) for n in lengths]
        self.modalities = None if modalities is None else [bool(m) for m in modalities]
        self.batch_size, self.grouping, self.seed, self.drop_last = batch_size, grouping, seed, drop_last
        self.world_size, self.rank = world_size, rank
        mega = world_size * batch_size
        total = (len(lengths) // mega if drop_last else math.ceil(len(lengths) / mega)) * mega
        if total == 0:
            raise ValueError(
                f"drop_last with {len(lengths)} rows leaves nothing: a step needs world_size * batch_size = {mega} rows"
            )
        self._total = total
        self.epoch, self.cursor = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_dataset(cls, dataset, batch_size: int, **kwargs) -> DistributedLengthGroupedSampler:
        """Build from anything with ``lengths()`` and ``modalities()`` (``DistillDataset``)."""
        return cls(dataset.lengths(), batch_size, modalities=dataset.modalities(), **kwargs)

    # -- order -----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples per rank per epoch (a multiple of ``batch_size``)."""
        return self._total // self.world_size

    def global_order(self, epoch: int) -> list[int]:
        """The grouped order over all rows for ``epoch``, before padding and sharding."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.grouping == "none":
            return torch.randperm(len(self.lengths), generator=g).tolist()
        if self.grouping == "length":
            return length_grouped_indices(self.lengths, self.batch_size, self.world_size, g)
        return modality_length_grouped_indices(self.lengths, self.modalities, self.batch_size, self.world_size, g)

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's whole order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._order is None or self._order[0] != epoch:
            order = np.resize(np.asarray(self.global_order(epoch), dtype=np.int64), self._total)
            mine = order.reshape(-1, self.world_size, self.batch_size)[:, self.rank, :].reshape(-1)
            self._order = (epoch, mine)
        return self._order[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order()[self.cursor :].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.cursor

    def iter_batches(self) -> Iterator[list[int]]:
        """This rank's remaining indices in lists of ``batch_size`` (for ``read_batch`` loops)."""
        rest = self.rank_order()[self.cursor :].tolist()
        return iter([rest[i : i + self.batch_size] for i in range(0, len(rest), self.batch_size)])

    # -- state -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at cursor 0; the current epoch keeps its cursor (resume)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.cursor = int(epoch), 0

    def advance(self, n: int) -> None:
        """Mark ``n`` more samples of this epoch as consumed (call once per trained batch)."""
        if n < 0 or self.cursor + n > self.num_samples:
            raise ValueError(
                f"advance({n}) from cursor {self.cursor} passes the end of the epoch "
                f"({self.num_samples} samples per rank); call set_epoch(epoch + 1) first"
            )
        self.cursor += n

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``(epoch, cursor)``; refuses a state saved under a different order function."""
        mine = self._identity()
        diffs = [f"{k}: saved={state.get(k)!r}, now={mine[k]!r}" for k in _STATE_CHECKED if state.get(k) != mine[k]]
        if diffs:
            raise ValueError(
                "sampler state was saved with a different configuration, so its cursor "
                "would not point at the same samples: "
                + "; ".join(diffs)
                + ". Resume with the saved settings (or start a new epoch deliberately)."
            )
        cursor = int(state["cursor"])
        if not 0 <= cursor <= self.num_samples:
            raise ValueError(f"sampler state cursor {cursor} outside 0..{self.num_samples}")
        self.epoch, self.cursor = int(state["epoch"]), cursor

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "grouping": self.grouping,
            "drop_last": self.drop_last,
            "dataset_size": len(self.lengths),
        }


def _check_args(n: int, batch_size: int, grouping: str, world_size: int, rank: int) -> None:
    if n < 1:
        raise ValueError("the sampler needs at least one row (the dataset is empty)")
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


__all__ = [
    "DistributedLengthGroupedSampler",
    "GROUPINGS",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "split_to_even_chunks",
]
