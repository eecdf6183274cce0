"""`rank`: examples ordered by self-influence (atypical, augmentation-unstable, memorised).

Reads only the index (no model, no Ray). Writes `rank/self_influence.parquet` with every
example in descending order and its rank, and prints the highest and lowest.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.index.layout import RANK
from pipeline.index.reader import Index

COLUMNS = ["key", "shard", "self_influence", "loss", "cls", "metadata"]
OUTPUT = RANK


@dataclass
class RankConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    top: int = 20  # how many of each end to print


def rank_table(index: Index) -> pa.Table:
    """Every example, highest self-influence first, with `rank` (0 = most self-influential)."""
    table = index.table(COLUMNS)
    order = pc.sort_indices(
        table, sort_keys=[("self_influence", "descending"), ("key", "ascending")]
    )
    ranked = table.take(order)
    return ranked.append_column("rank", pa.array(range(ranked.num_rows), pa.int64()))


def run_rank(config: RankConfig) -> pa.Table:
    index = Index(config.index)
    ranked = rank_table(index)
    url = index.write_table(OUTPUT, ranked)
    top = min(config.top, ranked.num_rows)
    print_rows("highest self-influence", ranked.slice(0, top))
    print_rows("lowest self-influence", ranked.slice(ranked.num_rows - top, top))
    print(f"{ranked.num_rows:,} examples ranked -> {url}")
    return ranked


def print_rows(title: str, rows: pa.Table) -> None:
    print(f"\n{title}:")
    print(f"  {'rank':>8}  {'self_influence':>14}  {'loss':>8}  {'cls':>4}  key [shard]")
    for row in rows.to_pylist():
        cls = "" if row["cls"] is None else row["cls"]
        print(
            f"  {row['rank']:>8}  {row['self_influence']:>14.6g}  {row['loss']:>8.4f}  "
            f"{cls!s:>4}  {row['key']} [{row['shard'].rsplit('/', 1)[-1]}]"
        )
