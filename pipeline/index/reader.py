"""Open a built index offline: the manifest, the parts, the vectors. pyarrow and numpy only."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.index.columnar import read_columns, read_rows, read_schema
from pipeline.index.manifest import read_manifest
from pipeline.index.parts import table_bytes, vectors
from pipeline.storage import Storage, open_storage

PARALLEL_PARTS = 16


class IndexNotFoundError(UserError, FileNotFoundError):
    """No index (no manifest.json) at the URI given."""


class EmptyIndexError(UserError, ValueError):
    """An index with factors but no parts yet: `build` has not run (or finished) there."""


class Index:
    """A built index under a local folder or s3:// URI."""

    def __init__(self, uri: str) -> None:
        self.storage: Storage = open_storage(uri)
        manifest = read_manifest(self.storage)
        if manifest is None:
            raise IndexNotFoundError(
                f"no index at {self.storage.uri} (no manifest.json there): check the path, or "
                f"create one: influence-ssl fit, then build, with --out {self.storage.uri}"
            )
        if not manifest.get("shards"):
            raise EmptyIndexError(
                f"the index at {self.storage.uri} is empty (no shard built yet): run "
                f"`influence-ssl build --out {self.storage.uri}` first"
            )
        self.manifest = manifest

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """All finished parts, in shard order (read a few at a time: on S3 each is a few
        round trips)."""
        paths = [s["part"] for s in self.manifest["shards"]]
        with ThreadPoolExecutor(max(1, min(PARALLEL_PARTS, len(paths)))) as pool:
            tables = list(pool.map(lambda p: self.read_part(p, columns), paths))
        # Parts may differ in their `meta.*` group columns (parts.py): missing ones are null.
        return pa.concat_tables(tables, promote_options="default")

    def read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One part's `columns` (None: all), fetching only those columns' bytes."""
        return read_columns(self.storage, path, columns)

    def offsets(self) -> np.ndarray:
        """First global row of each part, and the total at the end ([parts + 1])."""
        counts = [int(s["examples"]) for s in self.manifest["shards"]]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The given global rows, in the given order, reading only the parts that hold them."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        offsets = self.offsets()
        if len(rows) and (rows.min() < 0 or rows.max() >= offsets[-1]):
            raise IndexError(f"rows out of range [0, {offsets[-1]})")
        part_of = np.searchsorted(offsets, rows, side="right") - 1
        pieces, order = [], []
        for part in np.unique(part_of):  # only the row groups holding the rows
            wanted = np.flatnonzero(part_of == part)
            path = self.manifest["shards"][part]["part"]
            pieces.append(read_rows(self.storage, path, rows[wanted] - offsets[part], columns))
            order.append(wanted)
        if not pieces:
            return read_rows(self.storage, self.manifest["shards"][0]["part"], rows, columns)
        combined = pa.concat_tables(pieces, promote_options="default")  # meta.* may differ
        return combined.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))

    def columns(self) -> set[str]:
        """Column names of the parts (older indices lack pixel_hash and z)."""
        first = self.manifest["shards"][0]["part"]
        return set(read_schema(self.storage, first).names)  # the footer only

    def vectors(self, table: pa.Table | None = None) -> np.ndarray:
        """The `w` column (of `table`, or read now) as a dense [N, D] float32 array."""
        table = table if table is not None else self.table(["w"])
        return vectors(table).astype(np.float32, copy=False)

    def write_table(self, path: str, table: pa.Table) -> str:
        """Write an output (rank, dedup, groups) as Parquet beside the index; returns its URL."""
        self.storage.write_bytes(path, table_bytes(table))
        return self.storage.url(path)
