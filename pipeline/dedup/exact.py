"""Exact duplicates in bounded memory: rows grouped by `pixel_hash` with Arrow.

Each part's (pixel_hash, global row) is spilled to local bucket files by the hash's first
characters; then one bucket at a time is grouped (`group_by(...).aggregate(row min)`) and
joined back, giving an edge row -> anchor (the first row with that hash) for every copy.
Memory: one part's hashes, then one bucket (about BUCKET_ROWS rows), whatever N is.
"""

from __future__ import annotations

import math
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.index.reader import Index

# Rows per bucket aimed at: grouping one costs ~400 bytes a row (hashes, rows, Arrow's hash
# table and join), ~100 MB here. Up to 2.7 x 10^8 rows; above, buckets grow past it.
BUCKET_ROWS = 1 << 18
MAX_BUCKETS = 1024  # spill files open at once; a power of two dividing the 4,096 prefixes
PARALLEL_PARTS = 8
SPILL_SCHEMA = pa.schema([("pixel_hash", pa.string()), ("row", pa.int64())])
# Hex digit value of each byte ('0'-'9', 'a'-'f', 'A'-'F'); other bytes by their low nibble,
# so any string still lands in a fixed bucket.
_NIBBLE = np.arange(256, dtype=np.int64) & 15
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def bucket_count(rows: int) -> int:
    """A power of two, so buckets split the 4,096 three-character prefixes evenly."""
    wanted = math.ceil(rows / BUCKET_ROWS)
    return min(MAX_BUCKETS, 1 << max(0, math.ceil(math.log2(max(1, wanted)))))


def bucket_of(hashes: pa.Array, buckets: int) -> np.ndarray:
    """The bucket of each (non-null) string: its first three characters read as hex."""
    if buckets == 1 or len(hashes) == 0:
        return np.zeros(len(hashes), np.int64)
    hashes = hashes.cast(pa.large_string())
    offsets = np.frombuffer(hashes.buffers()[1], np.int64)[hashes.offset :][: len(hashes) + 1]
    data = np.frombuffer(hashes.buffers()[2], np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    value = np.zeros(len(hashes), np.int64)
    for position in range(3):
        present = lengths > position
        byte = data[np.where(present, starts + position, 0)] if len(data) else np.zeros(1, int)
        value = value * 16 + np.where(present, _NIBBLE[byte], 0)
    return value % buckets


def exact_edges(index: Index, threads: int = PARALLEL_PARTS) -> tuple[np.ndarray, np.ndarray]:
    """Edges (row, anchor) joining every row to the first row with the same non-empty
    pixel hash (rows without a hash are never joined)."""
    offsets = index.offsets()
    buckets = bucket_count(int(offsets[-1]))
    with tempfile.TemporaryDirectory(prefix="issl-dedup-hash-") as folder:
        spill = Spill(Path(folder), buckets)
        parts = [s["part"] for s in index.manifest["shards"]]

        def one(number: int) -> None:
            column = index.read_part(parts[number], ["pixel_hash"]).column("pixel_hash")
            spill.add(column.combine_chunks(), int(offsets[number]))

        with ThreadPoolExecutor(max(1, min(threads, len(parts)))) as pool:
            list(pool.map(one, range(len(parts))))
        spill.close()
        edges = [bucket_edges(table) for table in spill.tables()]
    if not edges:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges])


class Spill:
    """Append-only Arrow stream files, one per bucket, written under a lock."""

    def __init__(self, folder: Path, buckets: int) -> None:
        self.paths = [folder / f"bucket-{b:04d}.arrows" for b in range(buckets)]
        self.writers: list[pa.ipc.RecordBatchStreamWriter | None] = [None] * buckets
        self.lock = threading.Lock()

    def add(self, hashes: pa.Array, first_row: int) -> None:
        valid = pc.fill_null(pc.greater(pc.utf8_length(hashes), 0), False)
        rows = np.flatnonzero(valid.to_numpy(zero_copy_only=False))
        hashes = hashes.take(pa.array(rows))
        bucket = bucket_of(hashes, len(self.paths))
        order = np.argsort(bucket, kind="stable")
        edges = np.searchsorted(bucket[order], np.arange(len(self.paths) + 1))
        batch = pa.record_batch(
            [hashes.take(pa.array(order)), rows[order] + first_row], SPILL_SCHEMA
        )
        with self.lock:
            for b in np.flatnonzero(np.diff(edges)):
                writer = self.writers[b]
                if writer is None:
                    writer = self.writers[b] = pa.ipc.new_stream(str(self.paths[b]), SPILL_SCHEMA)
                writer.write_batch(batch.slice(edges[b], edges[b + 1] - edges[b]))

    def close(self) -> None:
        for writer in self.writers:
            if writer is not None:
                writer.close()

    def tables(self):
        """Each non-empty bucket as one table, one at a time."""
        for path, writer in zip(self.paths, self.writers, strict=True):
            if writer is not None:
                with pa.ipc.open_stream(str(path)) as reader:
                    yield reader.read_all()


def bucket_edges(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(row, anchor) for the rows of one bucket whose hash an earlier row has."""
    groups = table.group_by("pixel_hash").aggregate([("row", "min"), ("row", "count")])
    repeated = groups.filter(pc.greater(groups.column("row_count"), 1))
    if repeated.num_rows == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    joined = table.join(repeated.select(["pixel_hash", "row_min"]), "pixel_hash", join_type="inner")
    row = joined.column("row").to_numpy()
    anchor = joined.column("row_min").to_numpy()
    copy = row != anchor
    return row[copy], anchor[copy]
