"""The sampler's order is a pure function of its inputs, ranks partition the data, modality
grouping keeps image and text-only rows apart, and resume from (epoch, cursor) is exact."""

from __future__ import annotations

import heapq
import random

import pytest
import torch

from student.sampler import (
    DistributedLengthGroupedSampler as Sampler,
)
from student.sampler import (
    length_grouped_indices,
    split_to_even_chunks,
)

N = 53
LENGTHS = [(i * 37) % 101 + 1 for i in range(N)]
HAS_IMAGE = [i % 5 != 0 for i in range(N)]  # 11 text-only rows


def make(grouping="modality_length", **kw):
    return Sampler(LENGTHS, kw.pop("batch_size", 4), modalities=HAS_IMAGE, grouping=grouping, **kw)


@pytest.mark.parametrize("grouping", ["none", "length", "modality_length"])
def test_deterministic_across_instances_and_differs_by_epoch(grouping):
    a, b = make(grouping, seed=3), make(grouping, seed=3)
    assert list(a) == list(b)
    assert list(a) != list(make(grouping, seed=4))
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)


def test_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    list(make())
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("grouping", ["none", "length", "modality_length"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_and_cover(grouping, world):
    ranks = [make(grouping, world_size=world, rank=r, batch_size=3, seed=1) for r in range(world)]
    orders = [list(s) for s in ranks]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == ranks[0].num_samples
    assert ranks[0].num_samples % 3 == 0
    flat = [i for o in orders for i in o]
    assert set(flat) == set(range(N))  # every row, a few repeated to fill the last step
    assert len(flat) - N == len(flat) - len(set(flat)) < world * 3
    dropped = [
        list(make(grouping, world_size=world, rank=r, batch_size=3, seed=1, drop_last=True)) for r in range(world)
    ]
    flat = [i for o in dropped for i in o]
    assert len(flat) == len(set(flat)) == N // (world * 3) * world * 3  # disjoint


def test_exact_partition_when_divisible():
    lengths = list(range(1, 25))
    orders = [list(Sampler(lengths, 4, grouping="length", world_size=3, rank=r)) for r in range(3)]
    assert sorted(i for o in orders for i in o) == list(range(24))


def _megabatches(order, size):
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_modality_grouping_separates_image_and_text_only_rows():
    world, batch = 2, 3
    size = world * batch
    s = make(world_size=world, batch_size=batch, seed=5)
    order = s.global_order(0)
    assert sorted(order) == list(range(N))
    n_image = sum(HAS_IMAGE)
    leftover = (n_image - 1) % size + 1 + (N - n_image - 1) % size + 1  # LLaVA's last, mixed megabatch
    pure = order[: N - leftover]
    kinds = [{HAS_IMAGE[i] for i in m} for m in _megabatches(pure, size)]
    assert all(len(k) == 1 for k in kinds) and {False} in kinds and {True} in kinds
    assert order[N - leftover :] == sorted(order[N - leftover :])  # LLaVA sorts the leftover
    for r in range(world):  # each rank's batches from pure megabatches are pure
        mine = list(make(world_size=world, rank=r, batch_size=batch, seed=5))
        for b in _megabatches(mine, batch)[: len(pure) // size]:
            assert len({HAS_IMAGE[i] for i in b}) == 1
        assert set(mine[: len(pure) // world]) <= set(pure)


# -- an independent implementation of LLaVA's grouping (llava/train/llava_trainer.py) ---------------
# Written here from the algorithm's description, not from student.sampler: a greedy split that
# always feeds the non-full chunk with the smallest summed length (ties: the lowest chunk), via a
# heap; megabatches of world*batch rows of a random permutation, each sorted longest first, split
# that way; modality grouping = image and text-only rows grouped separately, their full
# megabatches shuffled together, both leftovers merged (sorted) at the end. One generator drives
# every draw (the project's documented change: LLaVA's inner shuffles use the global RNG).
def ref_split(indices, lengths, num_chunks):
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    heap = [(0, c) for c in range(num_chunks)]
    for index in indices:
        total, c = heapq.heappop(heap)
        chunks[c].append(index)
        if len(chunks[c]) < per:
            heapq.heappush(heap, (total + lengths[index], c))
    return chunks


def ref_length_grouped(lengths, batch, world, g):
    perm = torch.randperm(len(lengths), generator=g).tolist()
    size = world * batch
    out = []
    for mega in (perm[i : i + size] for i in range(0, len(perm), size)):
        for chunk in ref_split(sorted(mega, key=lambda i: -lengths[i]), lengths, world):
            out.extend(chunk)
    return out


def ref_modality_grouped(lengths, has_image, batch, world, g):
    groups = [[i for i in range(len(lengths)) if has_image[i]], [i for i in range(len(lengths)) if not has_image[i]]]
    size, full, rest = world * batch, [], []
    for group in groups:
        order = [group[i] for i in ref_length_grouped([lengths[i] for i in group], batch, world, g)]
        megas = [order[i : i + size] for i in range(0, len(order), size)]
        full, rest = full + megas[:-1], rest + megas[-1]
    return [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]] + sorted(rest)


def round_robin(indices, lengths, num_chunks):  # what a split that ignores lengths does
    return [indices[i::num_chunks] for i in range(num_chunks)]


@pytest.mark.parametrize("seed", range(20))
def test_split_to_even_chunks_is_llavas_greedy_balance(seed):
    rng = random.Random(seed)
    world = rng.choice([2, 3, 4, 8])
    lengths = [rng.randint(1, 2048) for _ in range(world * rng.randint(1, 6))]
    indices = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert split_to_even_chunks(indices, lengths, world) == ref_split(indices, lengths, world)
    odd = indices + [0] if len(indices) % world else indices[:-1]  # not divisible: LLaVA strides
    assert split_to_even_chunks(odd, lengths, world) == ref_split(odd, lengths, world)


def test_a_length_blind_split_fails_the_reference():
    """The check above can fail: a round-robin split differs from LLaVA's on most inputs."""
    rng = random.Random(0)
    differs = 0
    for _ in range(20):
        lengths = [rng.randint(1, 2048) for _ in range(16)]
        indices = sorted(range(16), key=lambda i: -lengths[i])
        differs += round_robin(indices, lengths, 4) != ref_split(indices, lengths, 4)
    assert differs >= 15
    lengths = [100, 90, 80, 70, 4, 3, 2, 1]  # greedy: {100, 70, 4, 1} and {90, 80, 3, 2}
    assert ref_split(list(range(8)), lengths, 2) == [[0, 3, 4, 7], [1, 2, 5, 6]]


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 3), (3, 2), (4, 4)])
def test_global_orders_equal_the_reference(world, batch):
    for epoch in range(3):
        g = torch.Generator().manual_seed(11 + epoch)
        assert make("length", world_size=world, batch_size=batch, seed=11).global_order(epoch) == ref_length_grouped(
            LENGTHS, batch, world, g
        )
        g = torch.Generator().manual_seed(11 + epoch)
        assert make(world_size=world, batch_size=batch, seed=11).global_order(epoch) == ref_modality_grouped(
            LENGTHS, HAS_IMAGE, batch, world, g
        )
    g = torch.Generator().manual_seed(0)
    assert length_grouped_indices(LENGTHS, 4, 2, g) == ref_length_grouped(
        LENGTHS, 4, 2, torch.Generator().manual_seed(0)
    )


def test_resume_from_epoch_and_cursor_is_exact():
    full = make(world_size=2, rank=1, seed=7)
    full.set_epoch(2)
    expected = list(full)
    run = make(world_size=2, rank=1, seed=7)
    run.set_epoch(2)
    for _ in range(3):
        run.advance(4)  # the trainer: once per batch trained on
    state = run.state_dict()
    assert state["epoch"] == 2 and state["cursor"] == 12
    fresh = make(world_size=2, rank=1, seed=7)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)  # a training loop calling set_epoch for the current epoch keeps the cursor
    assert list(fresh) == expected[12:] and len(fresh) == len(expected) - 12
    assert [i for b in fresh.iter_batches() for i in b] == expected[12:]
    fresh.set_epoch(3)
    assert fresh.cursor == 0 and list(fresh) != expected


def test_dataloader_resume_with_prefetching_workers():
    data = list(range(N))
    s = make(seed=2)
    dl = torch.utils.data.DataLoader(data, batch_size=4, sampler=s, num_workers=0)
    full = [b.tolist() for b in dl]
    it = iter(dl)
    for _ in range(5):
        next(it)
        s.advance(4)
    resumed = make(seed=2)
    resumed.load_state_dict(s.state_dict())
    dl2 = torch.utils.data.DataLoader(data, batch_size=4, sampler=resumed)
    assert len(dl2) == len(full) - 5
    assert [b.tolist() for b in dl2] == full[5:]


def test_state_and_argument_errors():
    s = make()
    with pytest.raises(ValueError, match="world_size: saved=2, now=1"):
        s.load_state_dict({**make(world_size=2).state_dict(), "cursor": 0})
    with pytest.raises(ValueError, match="seed: saved=9"):
        s.load_state_dict(make(seed=9).state_dict())
    with pytest.raises(ValueError, match="passes the end of the epoch"):
        s.advance(s.num_samples + 1)
    with pytest.raises(ValueError, match="rank 2 outside"):
        make(world_size=2, rank=2)
    with pytest.raises(ValueError, match="modalities"):
        Sampler(LENGTHS, 4, grouping="modality_length")
    with pytest.raises(ValueError, match="grouping must be one of"):
        make("random")
    with pytest.raises(ValueError, match="leaves nothing"):
        Sampler([1, 2], 4, drop_last=True)
