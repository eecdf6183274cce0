"""Stream an index part by part, in order, a few parts read ahead (bounded memory).

The offline verbs that must touch every row (`rank`, `groups`) go through here: at most
`window` parts' projected columns are in memory at once, never the whole index.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.index.reader import Index

WINDOW = 4  # parts in flight: on S3 each read is a few round trips, so overlap them


@dataclass
class Part:
    number: int  # position in the manifest's shard list
    start: int  # global row of its first row
    entry: dict  # its manifest entry ("part", "examples", ...)
    table: Any  # what `read` returned (a pa.Table for iter_parts)


def iter_parts(index: Index, columns: list[str], window: int = WINDOW) -> Iterator[Part]:
    """Every part's `columns`, in row order."""
    yield from iter_read(index, lambda _, entry: index.read_part(entry["part"], columns), window)


def iter_read(
    index: Index, read: Callable[[int, dict], Any], window: int = WINDOW
) -> Iterator[Part]:
    """`read(number, entry)` of every part, in row order, at most `window` of them pending."""
    entries = index.manifest["shards"]
    offsets = index.offsets()
    pending: deque[tuple[int, Future]] = deque()
    with ThreadPoolExecutor(max(1, window)) as pool:
        for number, entry in enumerate(entries):
            pending.append((number, pool.submit(read, number, entry)))
            if len(pending) >= window:
                yield _done(pending.popleft(), entries, offsets)
        while pending:
            yield _done(pending.popleft(), entries, offsets)


def _done(item: tuple[int, Future], entries: list[dict], offsets) -> Part:
    number, future = item
    return Part(number, int(offsets[number]), entries[number], future.result())
