"""Projected Parquet reads through pyarrow's filesystems (``Storage.open_arrow``).

The footer first, then only the wanted columns' chunks (of only the row groups holding the
wanted rows, for `read_rows`), by byte range: reading `key` and `self_influence` of an S3
part never downloads its `w`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Storage


@contextmanager
def open_parquet(storage: Storage, path: str) -> Iterator[pq.ParquetFile]:
    """The object as a ParquetFile (footer read; nothing else yet). pre_buffer coalesces
    nearby column chunks into few ranged reads, issued concurrently."""
    with storage.open_arrow(path) as source:
        yield pq.ParquetFile(source, pre_buffer=True)


def read_schema(storage: Storage, path: str) -> pa.Schema:
    with open_parquet(storage, path) as file:
        return file.schema_arrow


def read_columns(storage: Storage, path: str, columns: list[str] | None = None) -> pa.Table:
    """The given columns (None: all) of every row."""
    with open_parquet(storage, path) as file:
        return file.read(checked(file, columns, storage.url(path)))


def row_group_sizes(storage: Storage, path: str) -> list[int]:
    """Rows in each row group of the object, from its footer alone."""
    with open_parquet(storage, path) as file:
        return [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]


def read_row_groups(
    storage: Storage, path: str, groups: list[int], columns: list[str] | None = None
) -> pa.Table:
    """The given row groups (in the given order) of the object: the footer, then only those
    groups' chunks of `columns` (None: all)."""
    with open_parquet(storage, path) as file:
        columns = checked(file, columns, storage.url(path))
        bad = [g for g in groups if not 0 <= g < file.num_row_groups]
        if bad:
            raise IndexError(
                f"row groups {bad} out of range [0, {file.num_row_groups}) in {storage.url(path)}"
            )
        return file.read_row_groups(list(groups), columns)


def read_rows(
    storage: Storage, path: str, rows: np.ndarray, columns: list[str] | None = None
) -> pa.Table:
    """The given rows of the object (0-based, in the given order), reading only the row
    groups that hold them."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    with open_parquet(storage, path) as file:
        columns = checked(file, columns, storage.url(path))
        if not len(rows):
            schema = file.schema_arrow
            fields = [schema.field(c) for c in columns] if columns is not None else schema
            return pa.schema(fields).empty_table()
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
            raise IndexError(f"rows out of range [0, {starts[-1]}) in {storage.url(path)}")
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        table = file.read_row_groups(groups.tolist(), columns)
    # Where each chosen group starts in `table` (the chosen groups, concatenated in order).
    first = np.concatenate([[0], np.cumsum(np.diff(starts)[groups])])[:-1]
    local = rows - starts[group_of] + first[np.searchsorted(groups, group_of)]
    return table.take(pa.array(local, pa.int64()))


def checked(file: pq.ParquetFile, columns: list[str] | None, uri: str) -> list[str] | None:
    """``columns``, or KeyError naming those the file lacks (pyarrow would skip them)."""
    names = file.schema_arrow.names
    lacking = [c for c in columns or [] if c not in names]
    if lacking:
        raise KeyError(f"{uri} lacks column(s) {lacking} (it has {names})")
    return columns
