"""`query`: top-k proponents and opponents of query examples, offline, from an index.

Queries here are keys already in the index (their stored w). Influence is <w_q, w_t>;
retrieval ranks by normalised influence (cosine) by default, and reports both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.index.reader import Index
from pipeline.search import SearchIndex


@dataclass
class QueryConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    keys: list[str] = field(default_factory=list)  # query examples, by key
    top: int = 10
    normalized: bool = True  # rank by cos(w_q, w_t) (True) or by <w_q, w_t>
    out: str | None = None  # also write the results: .parquet, .csv or .json


def run_query(config: QueryConfig) -> pa.Table:
    if not config.keys:
        raise ValueError("no query: give keys with --set 'keys=[key1, key2]'")
    index = Index(config.index)
    table = index.table(["key", "shard", "w"])  # one read of the parts
    vectors = index.vectors(table)
    rows = rows_of(table, config.keys)
    queries = vectors[rows]
    search = SearchIndex.build(vectors, normalized=config.normalized)
    found = {
        "proponent": search.search(queries, config.top, exact_vectors=vectors),
        "opponent": search.search_opponents(queries, config.top, exact_vectors=vectors),
    }
    results = pa.concat_tables(
        [
            directional(table, vectors, queries, config.keys, direction, ids)
            for direction, (_, ids) in found.items()
        ]
    )
    print_results(results, config.keys)
    if config.out:
        write_results(results, config.out)
    return results


def rows_of(table: pa.Table, keys: list[str]) -> np.ndarray:
    """Row of each key; an unknown key is a clear error naming it."""
    position = {key: row for row, key in enumerate(table.column("key").to_pylist())}
    missing = [key for key in keys if key not in position]
    if missing:
        raise KeyError(f"key(s) not in the index: {missing[:10]}")
    return np.array([position[key] for key in keys])


def directional(
    table: pa.Table,
    vectors: np.ndarray,
    queries: np.ndarray,
    keys: list[str],
    direction: str,
    ids: np.ndarray,
) -> pa.Table:
    """One row per (query, rank) with raw and normalised influence."""
    q_index, r_index = np.meshgrid(np.arange(len(queries)), np.arange(ids.shape[1]), indexing="ij")
    ids = ids.reshape(-1)
    q_rows = q_index.reshape(-1)
    influence = np.einsum("nd,nd->n", queries[q_rows], vectors[ids])
    norms = np.linalg.norm(queries[q_rows], axis=1) * np.linalg.norm(vectors[ids], axis=1)
    return pa.table(
        {
            "query": pa.array([keys[q] for q in q_rows], pa.string()),
            "direction": pa.array([direction] * len(ids), pa.string()),
            "rank": pa.array(r_index.reshape(-1), pa.int32()),
            "key": table.column("key").take(pa.array(ids)),
            "shard": table.column("shard").take(pa.array(ids)),
            "influence": pa.array(influence.astype(np.float32)),
            "normalized_influence": pa.array(
                (influence / np.maximum(norms, 1e-30)).astype(np.float32)
            ),
        }
    )


def print_results(results: pa.Table, keys: list[str]) -> None:
    rows = results.to_pylist()
    for key in keys:
        print(f"\nquery {key}:")
        for direction in ("proponent", "opponent"):
            print(f"  top {direction}s:  {'influence':>12}  {'cosine':>8}  key")
            for row in rows:
                if row["query"] == key and row["direction"] == direction:
                    scores = f"{row['influence']:>12.5g}  {row['normalized_influence']:>8.4f}"
                    print(f"  {row['rank']:>14}  {scores}  {row['key']}")


def write_results(results: pa.Table, out: str) -> None:
    suffix = Path(out).suffix.lower()
    if suffix == ".parquet":
        pq.write_table(results, out)
    elif suffix == ".csv":
        pacsv.write_csv(results, out)
    elif suffix == ".json":
        Path(out).write_text(json.dumps(results.to_pylist(), indent=2))
    else:
        raise ValueError(f"--set out=... must end in .parquet, .csv or .json, not {out!r}")
    print(f"written: {out}")
