"""The streaming epoch partition (visionflow.data.shard_stream): ranks and loader workers get disjoint parts that
together hold every sample exactly once; rank parts are contiguous, differ by at most one sample and are padded to
one length; workers get whole batches."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from visionflow.data.shard_stream import epoch_order, even_cut, rank_part, worker_part
from visionflow.data.shards import Member

CASES = [(1, 1, 1, 1), (10, 2, 1, 4), (11, 2, 2, 4), (7, 3, 2, 2), (2, 3, 1, 1), (100, 4, 3, 8), (13, 5, 4, 1)]


def _cases():
    rng = random.Random(0)
    fuzz = [(rng.randint(0, 300), rng.randint(1, 9), rng.randint(1, 6), rng.randint(1, 17)) for _ in range(60)]
    return CASES + fuzz


@pytest.mark.parametrize(("n", "world", "workers", "batch"), _cases())
def test_ranks_and_workers_cover_every_sample_once(n, world, workers, batch):
    seen: Counter[int] = Counter()
    lengths = set()
    for rank in range(world):
        part, pad = rank_part(n, world, rank)
        padded = list(part) + pad
        lengths.add(len(padded))
        assert all(i in part for i in pad) or not part  # a rank repeats its own first sample(s)
        batches = 0
        got: list[int] = []
        for w in range(workers):
            piece = worker_part(len(padded), workers, w, batch)
            got.extend(padded[i] for i in piece)
            batches += -(-len(piece) // batch)
        assert sorted(got) == sorted(padded)  # workers split the rank's samples without loss or overlap
        assert batches == -(-len(padded) // batch)  # the loader's len(): same batch count on every rank
        seen.update(part)
    assert seen == Counter(range(n))  # the partition itself: every sample exactly once
    assert len(lengths) <= 1  # padded to one length: DDP ranks step together
    sizes = [len(rank_part(n, world, r)[0]) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_even_cut_is_contiguous_and_balanced():
    for n in range(0, 40):
        for parts in range(1, 7):
            cuts = [even_cut(n, parts, i) for i in range(parts)]
            assert [i for c in cuts for i in c] == list(range(n))
            assert max(map(len, cuts)) - min(map(len, cuts)) <= 1
    with pytest.raises(ValueError):
        even_cut(5, 2, 2)


def _members(shards: int, per: int) -> list[Member]:
    return [Member(f"c/s{s}_{i}.png", f"shard-{s:016x}.tar", 512, 1, "0") for s in range(shards) for i in range(per)]


def test_epoch_order_groups_by_shard_and_reshuffles_per_epoch():
    members = _members(6, 5)
    a, b, c = epoch_order(members, 1, 0), epoch_order(members, 1, 0), epoch_order(members, 1, 1)
    assert a == b and a != c and sorted(a, key=str) == sorted(members, key=str)
    runs = [m.shard for i, m in enumerate(a) if i == 0 or a[i - 1].shard != m.shard]
    assert len(runs) == 6  # each shard's samples are contiguous, so a contiguous rank part touches few shards
    assert epoch_order(members, 2, 0) != a
    # two ranks of a world of 2 touch at most one shard in common
    part0, _ = rank_part(len(a), 2, 0)
    part1, _ = rank_part(len(a), 2, 1)
    assert len({a[i].shard for i in part0} & {a[i].shard for i in part1}) <= 1
