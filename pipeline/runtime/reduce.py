"""A fixed binary tree over the shards of a pass, so partial sums combine in one order.

Node (level l, index i) covers shards [i * 2^l, (i + 1) * 2^l); its value is left + right,
and a node whose right half lies past the last shard is its left child unchanged. The
shape depends only on the number of shards, so the rounding of the float64 sums, and
therefore the factors, is the same for any number of workers and any finishing order.

Workers sum aligned blocks (subtrees) of consecutive shards in this order (`TreeSum`) and
return one partial per block; the driver combines the blocks up the same tree
(`TreeReduce`) as siblings finish, holding only what waits for a sibling. No Ray here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Node:
    level: int
    index: int

    @property
    def first(self) -> int:
        return self.index << self.level

    def end(self, leaves: int) -> int:
        return min((self.index + 1) << self.level, leaves)

    def parent(self) -> Node:
        return Node(self.level + 1, self.index >> 1)

    def sibling(self) -> Node:
        return Node(self.level, self.index ^ 1)

    def children(self) -> tuple[Node, Node]:
        return Node(self.level - 1, 2 * self.index), Node(self.level - 1, 2 * self.index + 1)

    def blocks(self, level: int, leaves: int) -> list[Node]:
        """The nodes at `level` (<= own) under this one that hold at least one shard."""
        step = 1 << (self.level - level)
        return [
            Node(level, i)
            for i in range(self.index * step, (self.index + 1) * step)
            if Node(level, i).first < leaves
        ]


def top_level(leaves: int) -> int:
    """The root's level: the smallest l with 2^l >= leaves."""
    return max(0, (leaves - 1).bit_length())


def block_level(leaves: int, workers: int, per_worker: int = 2, max_level: int = 30) -> int:
    """The largest block size (a level) that still gives every worker `per_worker` blocks.

    Any level gives the same sums; this one only balances the load while keeping the
    number of partials that cross the object store near `per_worker * workers`, however
    many shards there are.
    """
    level = 0
    while level < max_level and -(-leaves // (1 << (level + 1))) >= per_worker * workers:
        level += 1
    return level


Merge = Callable[[Any, Any], Any]


class TreeSum:
    """Sums consecutive leaves in tree order with a stack of at most level + 1 partials."""

    def __init__(self, block: Node, leaves: int, merge: Merge) -> None:
        self.block, self.leaves, self.merge = block, leaves, merge
        self.stack: list[tuple[Node, Any]] = []
        self.next = block.first

    def add(self, value: Any) -> None:
        """The value of the next leaf of the block."""
        node = Node(0, self.next)
        self.next += 1
        while self.stack and self.stack[-1][0] == node.sibling() and node.index & 1:
            left = self.stack.pop()[1]
            node, value = node.parent(), self.merge(left, value)
        self.stack.append((node, value))

    def result(self) -> Any:
        """The block's value: what is left on the stack, combined right to left; a right
        part is promoted to its left neighbour's level first (its own sibling is empty)."""
        if self.next != self.block.end(self.leaves):
            raise ValueError(f"block {self.block} got {self.next - self.block.first} leaves")
        value = self.stack.pop()[1]
        while self.stack:
            value = self.merge(self.stack.pop()[1], value)
        return value


@dataclass
class Pending:
    node: Node
    left: Any
    right: Any


class TreeReduce:
    """The driver's side: finished nodes wait here for their siblings.

    `add` returns the merge that became possible (left and right values of `node`), or
    None; a value of None stands for a subtree with nothing in it (every shard failed).
    """

    def __init__(self, leaves: int) -> None:
        self.leaves = leaves
        self.top = top_level(leaves)
        self.waiting: dict[Node, Any] = {}
        self.root: Any = None
        self.done = False

    def add(self, node: Node, value: Any) -> Pending | None:
        while True:
            if node.level == self.top:
                self.root, self.done = value, True
                return None
            sibling = node.sibling()
            if sibling.first >= self.leaves:
                node = node.parent()  # nothing on the right: the parent is this node
                continue
            if sibling not in self.waiting:
                self.waiting[node] = value
                return None
            other = self.waiting.pop(sibling)
            left, right = (value, other) if node.index < sibling.index else (other, value)
            if left is None or right is None:
                node, value = node.parent(), right if left is None else left
                continue
            return Pending(node.parent(), left, right)

    def forget(self, node: Node) -> None:
        """Drop every waiting value under `node` (its subtree is being recomputed)."""
        for waiting in list(self.waiting):
            if waiting.level <= node.level and waiting.first >> node.level == node.index:
                del self.waiting[waiting]
