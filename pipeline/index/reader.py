"""Open a built index offline: the manifest, the parts, the vectors. pyarrow and numpy only."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.manifest import read_manifest
from pipeline.index.parts import table_bytes, vectors
from pipeline.storage import Storage, open_storage


class Index:
    """A built index under a local folder or s3:// URI."""

    def __init__(self, uri: str) -> None:
        self.storage: Storage = open_storage(uri)
        manifest = read_manifest(self.storage)
        if manifest is None:
            raise FileNotFoundError(f"no index at {self.storage.uri} (no manifest.json)")
        if not manifest.get("shards"):
            raise ValueError(f"the index at {self.storage.uri} is empty: run `build` first")
        self.manifest = manifest

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """All finished parts, in shard order."""
        parts = [
            pq.read_table(io.BytesIO(self.storage.read_bytes(s["part"])), columns=columns)
            for s in self.manifest["shards"]
        ]
        return pa.concat_tables(parts)

    def vectors(self, table: pa.Table | None = None) -> np.ndarray:
        """The `w` column (of `table`, or read now) as a dense [N, D] float32 array."""
        table = table if table is not None else self.table(["w"])
        return vectors(table).astype(np.float32, copy=False)

    def write_table(self, path: str, table: pa.Table) -> str:
        """Write an output (rank, dedup, groups) as Parquet beside the index; returns its URL."""
        self.storage.write_bytes(path, table_bytes(table))
        return self.storage.url(path)
