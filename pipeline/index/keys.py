"""Key -> row lookup written by `build`: find a few keys among 10^8 rows reading O(1) objects.

Layout (beside the parts)::

    keys/manifest.json                      format, hash, buckets, the parts covered, duplicates
    keys/<generation>-bucket-00000.parquet  key, part, row, global_row, copies; sorted by key

A key's bucket is a stable 64-bit hash of its UTF-8 bytes mod the number of buckets (about
`bucket_rows` keys each). Each bucket is sorted by key and written in row groups of
`row_group_rows`, so the Parquet min/max statistics of the key column (in the footer) say
which one row group can hold a key: a lookup reads the manifest, then per bucket touched its
footer and one row group. A key present in several rows (the same key in two shards) is
stored once, at its first row, with `copies` > 1; the build counts such keys
(`duplicate_keys`) and a lookup of one warns.

Building streams the parts' `key` column one part at a time into per-bucket local spill
files (bounded buffers), then sorts one bucket at a time: memory is bounded by
`bucket_rows`, not by the index. A rebuild writes a new generation of files before the
manifest flips, so a reader never pairs a manifest with another build's buckets.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import os
import struct
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.index.columnar import open_parquet
from pipeline.index.layout import KEYS_DIR
from pipeline.index.reader import Index

log = logging.getLogger(__name__)

KEYS_MANIFEST = f"{KEYS_DIR}/manifest.json"
FORMAT = "influence-ssl/keys/1"
HASH = "blake2b-64"  # key_hashes; a lookup made with another hash is not used
# Keys per bucket: sorting one (~40 MB at 250k keys) stays below what streaming the parts
# takes, so the build's peak memory does not grow with N; lookups read one bucket per key.
BUCKET_ROWS = 250_000
ROW_GROUP_ROWS = 16_384  # keys in what one lookup reads of a bucket
SPILL_ROWS = 262_144  # rows waiting in memory, all buckets together, before a spill
PREFETCH_PARTS = 8  # parts' key columns read ahead (in order) while hashing
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("part", pa.int32()),  # the part's number in manifest order
        ("row", pa.int32()),  # row within that part
        ("global_row", pa.int64()),
        ("copies", pa.int32()),  # rows of the index with this key (> 1: a duplicate key)
    ]
)


class DuplicateKeyWarning(UserWarning):
    """A looked-up key is in several rows of the index; its first row was returned."""


# -- the hash -----------------------------------------------------------------------------------


def key_hashes(keys: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """A stable uint64 per key: the first 8 bytes (little-endian) of blake2b of its UTF-8
    bytes; the same in every process, machine and Python version (unlike `hash`)."""
    if isinstance(keys, pa.Array | pa.ChunkedArray):
        if keys.null_count:
            raise ValueError(f"{keys.null_count} null key(s): every row needs a key")
        keys = keys.to_pylist()
    digest = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
    return np.frombuffer(digest, "<u8").astype(np.uint64)


def bucket_of(keys: pa.Array | pa.ChunkedArray | list[str], buckets: int) -> np.ndarray:
    return (key_hashes(keys) % np.uint64(buckets)).astype(np.int64)


# -- the manifest -------------------------------------------------------------------------------


def parts_of(index: Index) -> list[dict]:
    """The parts a lookup covers, in row order (sha256 where the manifest records it)."""
    return [
        {"part": s["part"], "rows": int(s["examples"]), "sha256": s.get("part_sha256")}
        for s in index.manifest["shards"]
    ]


def read_key_manifest(index: Index) -> dict | None:
    try:
        return json.loads(index.storage.read_bytes(KEYS_MANIFEST))
    except FileNotFoundError:
        return None


def is_current(stored: dict | None, index: Index) -> bool:
    """The stored lookup is of this format and hash and covers exactly the current parts
    (anything else is rebuilt by `build`, and scanned around by `lookup_rows`)."""
    return (
        stored is not None
        and stored.get("format") == FORMAT
        and stored.get("hash") == HASH
        and stored.get("parts_covered") == parts_of(index)
    )


# -- building -----------------------------------------------------------------------------------


def build_key_lookup(
    index: Index,
    bucket_rows: int = BUCKET_ROWS,
    row_group_rows: int = ROW_GROUP_ROWS,
    spill_rows: int = SPILL_ROWS,
) -> dict:
    """Write `keys/` for the index unless the stored one covers the current parts; returns
    its manifest. Reads only the parts' `key` column, one part at a time."""
    if min(bucket_rows, row_group_rows, spill_rows) < 1:
        raise ValueError("bucket_rows, row_group_rows and spill_rows must be >= 1")
    stored = read_key_manifest(index)
    if is_current(stored, index):
        log.info("key lookup is current; not rebuilt")
        return stored
    started = time.perf_counter()
    parts = parts_of(index)
    total = sum(p["rows"] for p in parts)
    buckets = max(1, math.ceil(total / bucket_rows))
    state = json.dumps([parts, buckets, row_group_rows], sort_keys=True).encode()
    generation = hashlib.sha256(state).hexdigest()[:12]
    with tempfile.TemporaryDirectory(prefix="issl-keys-") as folder:
        spill = Spill(folder, buckets, spill_rows)
        for table in key_tables(index):
            spill.add(table, bucket_of(table.column("key"), buckets))
        spill.flush()
        counts, duplicates = [], Duplicates()
        for bucket in range(buckets):
            table = deduplicated(spill.read(bucket), duplicates)
            data = parquet_bytes(table, row_group_rows)
            index.storage.write_bytes(bucket_path(generation, bucket), data)
            counts.append(table.num_rows)
    manifest = {
        "format": FORMAT,
        "hash": HASH,
        "rows": total,
        "keys": sum(counts),
        "duplicate_keys": duplicates.keys,
        "duplicate_rows": duplicates.rows,
        "duplicate_examples": duplicates.examples,
        "bucket_rows": bucket_rows,
        "row_group_rows": row_group_rows,
        "generation": generation,
        "buckets": buckets,
        "bucket_keys": counts,
        "parts_covered": parts,
        "seconds": round(time.perf_counter() - started, 3),
    }
    index.storage.write_bytes(KEYS_MANIFEST, json.dumps(manifest, indent=2).encode())
    keep = {KEYS_MANIFEST} | {bucket_path(generation, b) for b in range(buckets)}
    index.storage.delete_many(n for n in index.storage.list(f"{KEYS_DIR}/") if n not in keep)
    print(describe(manifest), flush=True)
    return manifest


def bucket_path(generation: str, bucket: int) -> str:
    return f"{KEYS_DIR}/{generation}-bucket-{bucket:05d}.parquet"


def describe(manifest: dict) -> str:
    line = (
        f"key lookup: {manifest['keys']:,} keys in {manifest['buckets']} bucket(s), "
        f"{manifest['seconds']} s"
    )
    if manifest["duplicate_keys"]:
        line += (
            f"; {manifest['duplicate_keys']:,} key(s) occur in more than one row "
            f"({manifest['duplicate_rows']:,} extra rows, e.g. {manifest['duplicate_examples']}):"
            " a lookup returns the first"
        )
    return line


def key_tables(index: Index) -> Iterator[pa.Table]:
    """Each part's keys with their part number, row and global row, in part order; a few
    parts read ahead (on S3 each read is a few round trips), never all at once."""
    offsets = index.offsets()
    paths = [s["part"] for s in index.manifest["shards"]]
    with ThreadPoolExecutor(PREFETCH_PARTS) as pool:
        read = lambda path: pool.submit(index.read_part, path, ["key"])  # noqa: E731
        pending = deque(read(path) for path in paths[:PREFETCH_PARTS])
        for number in range(len(paths)):
            keys = pending.popleft().result().column("key")
            if number + PREFETCH_PARTS < len(paths):
                pending.append(read(paths[number + PREFETCH_PARTS]))
            rows = np.arange(len(keys), dtype=np.int32)
            yield pa.table(
                {
                    "key": keys,
                    "part": pa.array(np.full(len(keys), number, np.int32)),
                    "row": pa.array(rows),
                    "global_row": pa.array(offsets[number] + rows.astype(np.int64)),
                }
            )


class Spill:
    """Per-bucket local spill files. Rows wait in memory until `spill_rows` in all, then each
    bucket's waiting rows are appended to its file as one length-prefixed Arrow IPC stream
    (zstd). Nothing stays open between spills (no file handle per bucket, no footer metadata
    growing with every write as a Parquet writer's would)."""

    def __init__(self, folder: str, buckets: int, spill_rows: int) -> None:
        self.folder, self.spill_rows = folder, spill_rows
        self.waiting: list[list[pa.Table]] = [[] for _ in range(buckets)]
        self.buffered = 0

    def path(self, bucket: int) -> str:
        return os.path.join(self.folder, f"{bucket:05d}.arrows")

    def add(self, table: pa.Table, buckets: np.ndarray) -> None:
        if not table.num_rows:  # a part with no rows (every example was skipped)
            return
        order = np.argsort(buckets, kind="stable")
        grouped, sorted_buckets = table.take(pa.array(order)), buckets[order]
        present, starts = np.unique(sorted_buckets, return_index=True)
        ends = np.append(starts[1:], len(order))
        for bucket, start, end in zip(present, starts, ends, strict=True):
            self.waiting[bucket].append(grouped.slice(start, end - start))
        self.buffered += table.num_rows
        if self.buffered >= self.spill_rows:
            self.flush()

    def flush(self) -> None:
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        for bucket, pieces in enumerate(self.waiting):
            if not pieces:
                continue
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, pieces[0].schema, options=options) as writer:
                for piece in pieces:
                    writer.write_table(piece)
            data = sink.getvalue()
            with open(self.path(bucket), "ab") as file:
                file.write(struct.pack("<Q", data.size))
                file.write(data)
            self.waiting[bucket] = []
        self.buffered = 0

    def read(self, bucket: int) -> pa.Table:
        """Every row spilled to the bucket (an empty table when none hashed there)."""
        if not os.path.exists(self.path(bucket)):
            return SCHEMA.empty_table().drop_columns(["copies"])
        with open(self.path(bucket), "rb") as file:
            data = file.read()
        tables, at = [], 0
        while at < len(data):
            (size,) = struct.unpack_from("<Q", data, at)
            tables.append(pa.ipc.open_stream(pa.py_buffer(data[at + 8 : at + 8 + size])).read_all())
            at += 8 + size
        return pa.concat_tables(tables)


class Duplicates:
    """Keys found in more than one row, counted across buckets (a key has one bucket)."""

    def __init__(self) -> None:
        self.keys, self.rows = 0, 0
        self.examples: list[str] = []

    def add(self, keys: pa.Array, copies: np.ndarray) -> None:
        repeated = np.flatnonzero(copies > 1)
        self.keys += len(repeated)
        self.rows += int((copies[repeated] - 1).sum())
        room = 10 - len(self.examples)
        if room > 0 and len(repeated):
            self.examples += keys.take(pa.array(repeated[:room])).to_pylist()


def deduplicated(table: pa.Table, duplicates: Duplicates) -> pa.Table:
    """The bucket sorted by key, one row per key: its first row (lowest global row), with
    how many rows carry it."""
    table = table.sort_by([("key", "ascending"), ("global_row", "ascending")])
    keys = table.column("key").combine_chunks()
    if len(keys) == 0:
        return SCHEMA.empty_table()
    first = np.ones(len(keys), bool)
    first[1:] = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(first)
    copies = np.diff(np.append(starts, len(keys))).astype(np.int32)
    table = table.filter(pa.array(first)) if len(starts) < len(keys) else table
    duplicates.add(table.column("key").combine_chunks(), copies)
    return table.append_column("copies", pa.array(copies)).cast(SCHEMA)


def parquet_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_rows, compression="zstd")
    return buffer.getvalue()


# -- lookup -------------------------------------------------------------------------------------


def lookup_rows(index: Index, keys: list[str]) -> np.ndarray:
    """The global row of each key (int64, in the order given). An unknown key is a KeyError
    naming it (the first 10). Uses `keys/` when it covers the current parts: per bucket
    touched, its footer and the row groups whose key range holds a wanted key; otherwise
    streams the key column part by part (an older build, or parts changed since)."""
    keys = [str(key) for key in keys]
    if not keys:
        return np.empty(0, np.int64)
    wanted = list(dict.fromkeys(keys))  # each distinct key once
    stored = read_key_manifest(index)
    if is_current(stored, index):
        found = lookup_stored(index, stored, wanted)
    else:
        print(
            f"note: no current key lookup under {index.storage.uri} (an index built before "
            "`keys/`, or parts changed since): scanning the key column part by part; rerun "
            "`build` to write it",
            flush=True,
        )
        found = scan_parts(index, wanted)
    missing = [key for key in wanted if key not in found]
    if missing:
        more = f" ({len(missing)} in all)" if len(missing) > 10 else ""
        raise KeyError(f"key(s) not in the index: {missing[:10]}{more}")
    return np.array([found[key] for key in keys], dtype=np.int64)


def lookup_stored(index: Index, manifest: dict, wanted: list[str]) -> dict[str, int]:
    """{key: global row} for the wanted keys found, through the stored buckets."""
    of = bucket_of(wanted, manifest["buckets"])
    groups = [[wanted[i] for i in np.flatnonzero(of == b)] for b in np.unique(of)]
    files = [bucket_path(manifest["generation"], int(b)) for b in np.unique(of)]
    with ThreadPoolExecutor(max(1, min(16, len(files)))) as pool:
        tables = list(pool.map(lambda fk: read_bucket(index, *fk), zip(files, groups, strict=True)))
    found: dict[str, int] = {}
    repeated: list[str] = []
    for table in tables:
        for key, row, copies in zip(
            table.column("key").to_pylist(),
            table.column("global_row").to_pylist(),
            table.column("copies").to_pylist(),
            strict=True,
        ):
            found[key] = row
            if copies > 1:
                repeated.append(f"{key} ({copies} rows)")
    if repeated:
        warnings.warn(
            f"key(s) in more than one row of the index, the first row returned: {repeated[:10]}",
            DuplicateKeyWarning,
            stacklevel=3,
        )
    return found


def read_bucket(index: Index, path: str, keys: list[str]) -> pa.Table:
    """The rows of `keys` found in one bucket, reading only the row groups whose [min, max]
    key statistics can hold one of them (one group per key at most: the bucket is sorted)."""
    with open_parquet(index.storage, path) as file:
        groups = candidate_groups(file.metadata, sorted(keys))
        if not groups:
            return SCHEMA.empty_table()
        table = file.read_row_groups(groups, ["key", "global_row", "copies"])
    at = positions(pa.array(keys, pa.string()), table.column("key").combine_chunks())
    return table.take(pa.array(at[at >= 0]))


def candidate_groups(metadata: pq.FileMetaData, keys: list[str]) -> list[int]:
    """Row groups (ascending) whose key range holds one of the sorted `keys`; a group
    without statistics is read whenever asked."""
    column = metadata.schema.to_arrow_schema().get_field_index("key")
    lows, highs = [], []
    for g in range(metadata.num_row_groups):
        stats = metadata.row_group(g).column(column).statistics
        known = stats is not None and stats.has_min_max
        lows.append(stats.min if known else None)
        highs.append(stats.max if known else None)
    if any(low is None for low in lows):
        return list(range(metadata.num_row_groups))
    chosen = set()
    for key in keys:
        g = bisect.bisect_left(highs, key)  # groups are sorted and disjoint
        if g < len(highs) and lows[g] <= key:
            chosen.add(g)
    return sorted(chosen)


def scan_parts(index: Index, wanted: list[str]) -> dict[str, int]:
    """{key: first global row} by streaming the key column part by part: memory is one
    part's keys and the wanted set, never a dict of every key. Stops once all are found."""
    value_set = pa.array(wanted, pa.string())
    found: dict[str, int] = {}
    offsets = index.offsets()
    for number, shard in enumerate(index.manifest["shards"]):
        at = positions(index.read_part(shard["part"], ["key"]).column("key"), value_set)
        for row in np.flatnonzero(at >= 0):
            found.setdefault(wanted[at[row]], int(offsets[number] + row))
        if len(found) == len(wanted):
            break
    return found


def positions(values: pa.Array | pa.ChunkedArray, value_set: pa.Array) -> np.ndarray:
    """For each value, its position in `value_set`, or -1 (int64)."""
    at = pc.index_in(values, value_set=value_set)
    return at.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
