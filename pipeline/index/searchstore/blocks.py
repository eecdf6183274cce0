"""Reading a shard's float16 vector blocks for exact re-ranking, by pread."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from pipeline.index.searchstore.layout import local_file

if TYPE_CHECKING:
    from pipeline.index.searchstore.store import SearchStore
from pipeline.search import (
    to_float32,
)


class BlockReader:
    """A shard's float16 blocks, read with pread for one search call: a run of consecutive
    rows in one read (a memory map measured no faster per scattered row).

    Not a memory map: the kernel maps ~0.1-0.7 MiB of page cache into the process around
    each scattered row a mapping faults in (fault-around, read-ahead, large folios), so
    re-ranking a few thousand candidates showed as gigabytes of resident memory at 4 x 10^6
    rows. A pread copies exactly the row; the page cache is shared and not this process's."""

    def __init__(self, store: SearchStore, shard: dict) -> None:
        self.store, self.shard = store, shard
        self.rows = int(store.manifest["vector_block_rows"])
        self.files: dict[int, tuple[int, int]] = {}  # block -> (fd, offset of row 0)
        self.half = np.empty((0, store.dimension), np.float16)  # reused by read and fetch
        self.single = np.empty((0, store.dimension), np.float32)

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (sorted, distinct: what `rerank` asks for) as float32 [n, D], a view
        valid until the next fetch. The buffers are reused: fresh ones each re-rank step (a
        few MiB) cost as much in page faults as the conversion itself."""
        if len(self.single) < len(ids):
            self.single = np.empty((len(ids), self.store.dimension), np.float32)
        return to_float32(self.read(ids), out=self.single[: len(ids)])

    def read(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `ids` (sorted, distinct) as stored, float16 [n, D], into `out` or a reused
        buffer (valid until the next read): one pread per run of consecutive rows, the runs'
        files and offsets worked out with numpy."""
        row_bytes = 2 * self.store.dimension
        if out is None:
            if len(self.half) < len(ids):
                self.half = np.empty((len(ids), self.store.dimension), np.float16)
            out = self.half[: len(ids)]
        if len(ids) == 0:
            return out
        block_of = ids // self.rows
        run_starts = (np.diff(ids, prepend=-2) != 1) | (np.diff(block_of, prepend=-1) != 0)
        starts = np.flatnonzero(run_starts)
        blocks, which = np.unique(block_of[starts], return_inverse=True)
        opened = np.array([self.block(int(b)) for b in blocks], np.int64).reshape(-1, 2)
        offsets = opened[which, 1] + (ids[starts] - block_of[starts] * self.rows) * row_bytes
        bounds = np.append(starts, len(ids)) * row_bytes
        buffer = memoryview(out).cast("B")
        for fd, lo, hi, offset in zip(
            opened[which, 0].tolist(), bounds[:-1].tolist(), bounds[1:].tolist(),
            offsets.tolist(), strict=True,
        ):  # fmt: skip
            if os.preadv(fd, [buffer[lo:hi]], offset) != hi - lo:
                raise ValueError(f"search vectors of {self.shard['file']} ended early")
        return out

    def block(self, number: int) -> tuple[int, int]:
        if number not in self.files:
            entry = self.shard["vectors"][number]
            # Blocks are large: a local one is checked by header and size, not hashed (an S3
            # copy is hashed as it is downloaded).
            path = local_file(self.store.index.storage, entry, verify=False)
            start = open_block(path, entry, self.store.dimension).offset
            self.files[number] = (os.open(path, os.O_RDONLY), int(start))
        return self.files[number]


def open_block(path: str, entry: dict, dimension: int) -> np.ndarray:
    try:
        block = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"search vectors {entry['file']} could not be read: {e}") from e
    if block.shape != (entry["rows"], dimension) or block.dtype != np.float16:
        raise ValueError(
            f"search vectors {entry['file']} hold {block.dtype} {block.shape}, the manifest "
            f"says float16 ({entry['rows']}, {dimension})"
        )
    if os.path.getsize(path) != entry["bytes"]:
        raise ValueError(f"search vectors {entry['file']} have the wrong size (truncated?)")
    return block
