"""The fixed reduce tree: any block size, worker count and finishing order give one sum."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.influence.statistics import Statistics
from pipeline.runtime.reduce import Node, TreeReduce, TreeSum, block_level, top_level


def shape(left: str, right: str) -> str:
    return f"({left}+{right})"


def reduce_blocks(leaves: int, level: int, leaf, merge, seed: int, empty: set[int] = frozenset()):
    """Blocks summed by TreeSum, then merged by TreeReduce in a random finishing order."""
    rng = random.Random(seed)
    finished = []
    for block in Node(top_level(leaves), 0).blocks(level, leaves):
        indices = range(block.first, block.end(leaves))
        if any(i in empty for i in indices):  # a failed block is split down to its shards
            finished += [(Node(0, i), None if i in empty else leaf(i)) for i in indices]
            continue
        tree = TreeSum(block, leaves, merge)
        for i in indices:
            tree.add(leaf(i))
        finished.append((block, tree.result()))
    reduce = TreeReduce(leaves)
    while finished:
        node, value = finished.pop(rng.randrange(len(finished)))
        pending = reduce.add(node, value)
        if pending is not None:
            finished.append((pending.node, merge(pending.left, pending.right)))
    assert reduce.done and not reduce.waiting
    return reduce.root


@pytest.mark.parametrize("leaves", [1, 2, 3, 5, 8, 13, 64, 100])
def test_every_block_size_and_order_gives_the_same_tree(leaves):
    expected = reduce_blocks(leaves, 0, str, shape, seed=0)
    assert sorted(expected.replace("(", "").replace(")", "").split("+"), key=int) == [
        str(i) for i in range(leaves)
    ]
    for level in range(top_level(leaves) + 1):
        for seed in range(3):
            assert reduce_blocks(leaves, level, str, shape, seed) == expected


def test_float64_sums_are_bit_identical_across_block_sizes():
    """The property fit relies on: factors independent of the workers, to the last bit."""
    rng = torch.Generator().manual_seed(0)
    values = [
        torch.randn(50, generator=rng, dtype=torch.float64) * 10 ** (i % 7) for i in range(37)
    ]

    def leaf(i: int) -> Statistics:
        stats = Statistics()
        stats.add("g", values[i], 1)
        return stats

    def merge(left: Statistics, right: Statistics) -> Statistics:
        return Statistics.from_tensors(left.to_tensors()).merge(right)

    sums = [
        reduce_blocks(37, lv, leaf, merge, seed=lv).sums["g"] for lv in range(top_level(37) + 1)
    ]
    assert all(torch.equal(s, sums[0]) for s in sums)
    naive = sum(values[::-1], torch.zeros(50, dtype=torch.float64))
    assert not torch.equal(naive, sums[0])  # another order rounds differently: the tree matters
    assert torch.allclose(naive, sums[0])


def test_failed_shards_are_empty_leaves():
    full = reduce_blocks(9, 0, str, shape, seed=0, empty={4})
    assert "4" not in full.split("+") and full.count("+") == 7
    assert reduce_blocks(9, 2, str, shape, seed=5, empty={4}) == full
    assert reduce_blocks(3, 1, str, shape, seed=0, empty={0, 1, 2}) is None


def test_blocks_give_each_worker_a_few_and_cap_nothing_else():
    assert block_level(16, 1) == 3  # 2 blocks of 8
    assert block_level(256, 1) == 7  # still 2 partials, however many shards
    assert block_level(64, 3) == 3  # 8 blocks for 3 workers
    assert block_level(5, 8) == 0  # fewer shards than workers: one shard each
    with pytest.raises(ValueError):
        TreeSum(Node(1, 0), 4, shape).result()  # a block must get all its leaves
