"""`rank`: examples ordered by self-influence (atypical, augmentation-unstable, memorised).

Reads only the index (no model, no Ray), part by part, in memory bounded by `partition_rows`
and one part, never by the number of rows N. The order is self_influence descending, then
key ascending for ties, NaN last (as pyarrow sorts); `rank` 0 is the most self-influential.

1. Every part's `self_influence` alone: the count; a seeded sample, whose quantiles are the
   range-partition boundaries (about `partition_rows` rows each); a fixed log-scale
   histogram (the report's plot); and the `top_k` highest and lowest rows (each part's
   argpartition merged into the ends so far; keys read only to break ties at the cut).
2. Every part's output columns, each row appended to its partition's local spill file
   (Parquet, small row groups; at most SPILL_ROWS rows buffered over all partitions).
3. Each partition alone: sorted, given its global `rank`, written through the storage.

Writes `rank/sorted/part-00000.parquet`... (every row, partition by partition in rank order),
`rank/top.parquet` (the top and bottom `top_k` rows, with rank) and, last, `rank/summary.json`
(rows; partitions with file, rows, first rank and self_influence range; quantiles;
histogram). Rows sharing one self_influence value share a partition (that keeps the key
order exact), so a value held by more than `partition_rows` rows makes its partition larger.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import SettingError
from pipeline.index.columnar import read_columns, read_rows
from pipeline.index.layout import RANK_DIR
from pipeline.index.parts import table_bytes
from pipeline.index.reader import Index
from pipeline.index.scan import iter_parts

COLUMNS = ["key", "shard", "self_influence", "loss", "cls", "metadata"]
SUMMARY = f"{RANK_DIR}/summary.json"
TOP = f"{RANK_DIR}/top.parquet"
REFINED = f"{RANK_DIR}/refined.parquet"
SORTED_DIR = f"{RANK_DIR}/sorted"
LEGACY = f"{RANK_DIR}/self_influence.parquet"  # before partitions: every row in one file
SORT_KEYS = [("self_influence", "descending"), ("key", "ascending")]
SAMPLE_PER_PARTITION = 1000  # boundary quantiles: partition sizes within a few percent
MAX_SAMPLE = 1_000_000  # floats held for the boundaries (4 MB)
SPILL_ROWS = 65_536  # rows buffered before they go to the spill files
BINS_PER_DECADE = 64  # the fixed histogram: bins of 10^(1/64) (3.7%) over positive values
SEED = 0


@dataclass
class RankConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    top: int = 20  # how many of each end to print
    top_k: int = 1000  # rows of each end kept in rank/top.parquet (what the report shows)
    # Rows per sorted partition: the sort's memory (~100-300 B a row). 250k keeps a rank of
    # 4e6 rows within 1.5x the memory of one of 1e5; larger sorts faster in fewer files.
    partition_rows: int = 250_000
    write_sorted: bool = True  # false: only the ends and the summary (one narrow pass)
    # Re-embed the `refine_top` most self-influential examples with `refine` views (images
    # read back from their shards by key) and order them by that less noisy self-influence
    # (rank/refined.parquet); 0: off. The index's V views rank the top coarsely: its
    # self-influence Spearman across view draws is ~0.9 at V = 16 (docs/benchmarks.md).
    refine: int = 0
    refine_top: int = 200
    # As for query: settings on top of the manifest's (e.g. model.checkpoint if it moved).
    model: dict = field(default_factory=dict)
    device: str = "cpu"


def check_config(config: RankConfig) -> None:
    if config.top < 0 or config.top_k < 1 or config.partition_rows < 1:
        raise SettingError("rank needs top >= 0, top_k >= 1 and partition_rows >= 1")
    if config.refine == 1 or config.refine < 0 or config.refine_top < 1:
        raise SettingError(
            f"rank needs refine = 0 (off) or >= 2 views and refine_top >= 1, got "
            f"refine={config.refine}, refine_top={config.refine_top}"
        )


# -- order ------------------------------------------------------------------------------------


def order_key(values: np.ndarray) -> np.ndarray:
    """uint32 keys in the order of float32 `values`, NaN lowest (last in descending order);
    -0.0 is 0.0, as pyarrow compares them."""
    s = np.asarray(values, np.float32) + np.float32(0)
    bits = s.view(np.uint32)
    key = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31))
    key[np.isnan(s)] = 0  # no number maps to 0: that would be the NaN bit pattern 0xFFFFFFFF
    return key


class Ends:
    """The first `k` rows of one end of the rank order, over parts added in row order.

    `highest`: the top (self_influence descending, key ascending); else the bottom read
    from the end (self_influence ascending, key descending). Memory: k rows, plus one part's
    candidates (its k best and any ties with its k-th)."""

    def __init__(self, k: int, highest: bool, keys_of: Callable[[np.ndarray], list[str]]):
        self.k, self.highest, self.keys_of = k, highest, keys_of
        self.score = np.empty(0, np.int64)  # smaller is nearer the end
        self.rows = np.empty(0, np.int64)
        self.keys: dict[int, str] = {}  # of rows whose key was needed for a tie

    def add(self, keys: np.ndarray, start: int) -> None:
        """One part's order keys (`order_key`); its first row is global row `start`."""
        score = (0xFFFFFFFF - keys.astype(np.int64)) if self.highest else keys.astype(np.int64)
        local = np.arange(len(score))
        if len(score) > self.k:
            local = np.flatnonzero(score <= np.partition(score, self.k - 1)[self.k - 1])
        self.score = np.concatenate([self.score, score[local]])
        self.rows = np.concatenate([self.rows, start + local])
        self._trim()

    def _trim(self) -> None:
        if len(self.score) <= self.k:
            return
        cut = np.partition(self.score, self.k - 1)[self.k - 1]
        better, tied = np.flatnonzero(self.score < cut), np.flatnonzero(self.score == cut)
        need = self.k - len(better)
        if len(tied) > need:  # ties at the cut: by key (the bottom end takes the largest)
            order = np.argsort(self._keys(self.rows[tied]), kind="stable")
            tied = tied[(order if self.highest else order[::-1])[:need]]
        keep = np.concatenate([better, tied])
        self.score, self.rows = self.score[keep], self.rows[keep]
        self.keys = {int(r): self.keys[int(r)] for r in self.rows if int(r) in self.keys}

    def _keys(self, rows: np.ndarray) -> np.ndarray:
        missing = [int(r) for r in rows if int(r) not in self.keys]
        if missing:
            self.keys.update(zip(missing, self.keys_of(np.asarray(missing)), strict=True))
        return np.array([self.keys[int(r)] for r in rows], dtype=object)


# -- pass 1: self_influence alone --------------------------------------------------------------


@dataclass
class Scan:
    """What pass 1 learns from the self_influence column."""

    rows: int
    nan: int = 0
    non_positive: int = 0
    infinite: int = 0
    sample: list[np.ndarray] = field(default_factory=list)
    histogram: dict[int, int] = field(default_factory=dict)  # log bin -> count

    def add_histogram(self, s: np.ndarray) -> None:
        finite = s[np.isfinite(s)]
        self.nan += int(np.isnan(s).sum())
        self.infinite += int(np.isinf(s).sum())
        positive = finite[finite > 0].astype(np.float64)
        self.non_positive += int(len(finite) - len(positive))
        bins, counts = np.unique(np.floor(np.log10(positive) * BINS_PER_DECADE), return_counts=True)
        for b, c in zip(bins.astype(int).tolist(), counts.tolist(), strict=True):
            self.histogram[b] = self.histogram.get(b, 0) + c

    def histogram_json(self) -> dict:
        """Counts of positive finite values in bins [10^(b/64), 10^((b+1)/64)) from `first`."""
        if not self.histogram:
            counts, first = [], 0
        else:
            first, last = min(self.histogram), max(self.histogram)
            counts = [self.histogram.get(b, 0) for b in range(first, last + 1)]
        return {
            "bins_per_decade": BINS_PER_DECADE,
            "first": first,
            "counts": counts,
            "non_positive": self.non_positive,
            "nan": self.nan,
            "infinite": self.infinite,
        }


def scan(index: Index, k: int, partitions: int) -> tuple[Scan, Ends, Ends]:
    """Pass 1: counts, histogram, boundary sample and both ends, from self_influence."""
    total = int(index.offsets()[-1])
    rate = min(1.0, min(MAX_SAMPLE, SAMPLE_PER_PARTITION * partitions) / max(1, total))
    rng = np.random.default_rng(SEED)

    def keys_of(rows: np.ndarray) -> list[str]:
        return index.take(rows, ["key"]).column("key").to_pylist()

    found = Scan(total)
    top, bottom = Ends(k, True, keys_of), Ends(k, False, keys_of)
    for part in iter_parts(index, ["self_influence"]):
        s = part.table.column("self_influence").to_numpy().astype(np.float32, copy=False)
        found.add_histogram(s)
        picked = s[rng.random(len(s)) < rate]
        found.sample.append(picked[~np.isnan(picked)])
        keys = order_key(s)
        top.add(keys, part.start)
        bottom.add(keys, part.start)
    return found, top, bottom


def boundaries(sample: np.ndarray, partitions: int) -> np.ndarray:
    """Descending, distinct self_influence values splitting `sample` into `partitions`
    near-equal ranges: partition j holds boundary[j-1] > s >= boundary[j] (NaN: the last)."""
    if partitions <= 1 or not len(sample):
        return np.empty(0, np.float32)
    ordered = np.sort(sample)[::-1]
    picks = ordered[(np.arange(1, partitions) * len(ordered)) // partitions]
    return np.unique(picks)[::-1]


def partition_of(s: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    ascending = bounds[::-1]
    j = len(bounds) - np.searchsorted(ascending, s, side="right")
    j[np.isnan(s)] = len(bounds)
    return j


# -- pass 2: spill rows by partition ---------------------------------------------------------


class Spill:
    """One local Parquet file per partition, rows appended in global row order; at most
    about SPILL_ROWS rows buffered in memory over all partitions."""

    def __init__(self, folder: str, partitions: int) -> None:
        self.folder = folder
        self.buffers: list[list[pa.Table]] = [[] for _ in range(partitions)]
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.buffered = 0

    def path(self, j: int) -> str:
        return os.path.join(self.folder, f"partition-{j:05d}.parquet")

    def add(self, table: pa.Table, partition: np.ndarray) -> None:
        order = np.argsort(partition, kind="stable")
        counts = np.bincount(partition, minlength=len(self.buffers))
        grouped = table.take(pa.array(order))
        starts = np.concatenate([[0], np.cumsum(counts)])
        for j in np.flatnonzero(counts):
            self.buffers[j].append(grouped.slice(int(starts[j]), int(counts[j])))
        self.buffered += table.num_rows
        if self.buffered >= SPILL_ROWS:
            self.flush()

    def flush(self) -> None:
        for j, pieces in enumerate(self.buffers):
            if not pieces:
                continue
            chunk = pa.concat_tables(pieces).combine_chunks()
            if j not in self.writers:
                self.writers[j] = pq.ParquetWriter(self.path(j), chunk.schema, compression="lz4")
            self.writers[j].write_table(chunk.cast(self.writers[j].schema))
            self.buffers[j] = []
        self.buffered = 0

    def close(self) -> None:
        self.flush()
        for writer in self.writers.values():
            writer.close()

    def read(self, j: int) -> pa.Table | None:
        return pq.read_table(self.path(j)) if j in self.writers else None


def spill(index: Index, bounds: np.ndarray, folder: str) -> Spill:
    """Pass 2: every part's output columns, appended to their partitions' spill files."""
    out = Spill(folder, len(bounds) + 1)
    for part in iter_parts(index, COLUMNS):
        table = part.table.replace_schema_metadata(None)
        s = table.column("self_influence").to_numpy().astype(np.float32, copy=False)
        out.add(table, partition_of(s, bounds))
    out.close()
    return out


# -- pass 3: sort each partition alone ---------------------------------------------------------


def quantile_ranks(valid: int, qs: dict[str, float]) -> dict[str, tuple[int, int, float]]:
    """Per quantile (numpy's linear rule over the `valid` non-NaN values): the descending
    ranks of its lower and upper neighbours and the weight of the upper one."""
    out = {}
    for name, q in qs.items():
        position = q * (valid - 1)
        lower, upper = math.floor(position), math.ceil(position)
        out[name] = (valid - 1 - lower, valid - 1 - upper, position - lower)
    return out


def sort_partitions(index: Index, out: Spill, partitions: int, valid: int) -> tuple[list, dict]:
    """Pass 3: sort, rank and publish each partition; (partition entries, quantiles)."""
    wanted = quantile_ranks(valid, {"median": 0.5, "p99": 0.99, "max": 1.0}) if valid else {}
    at: dict[int, float] = {}
    ranks = {r for lo, hi, _ in wanted.values() for r in (lo, hi)}
    entries, first = [], 0
    for j in range(partitions):
        table = out.read(j)
        if table is None or not table.num_rows:
            continue
        table = table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))
        n = table.num_rows
        table = table.append_column("rank", pa.array(np.arange(first, first + n), pa.int64()))
        path = f"{SORTED_DIR}/part-{len(entries):05d}.parquet"
        index.storage.write_bytes(path, table_bytes(table))
        s = table.column("self_influence").to_numpy()
        for r in ranks:
            if first <= r < first + n:
                at[r] = float(s[r - first])
        finite = s[~np.isnan(s)]
        entries.append(
            {
                "file": path,
                "rows": n,
                "first_rank": first,
                "max_self_influence": float(finite.max()) if len(finite) else None,
                "min_self_influence": float(finite.min()) if len(finite) else None,
            }
        )
        os.remove(out.path(j))
        first += n
    if first != index.offsets()[-1]:
        raise ValueError(f"the parts hold {first} rows, the manifest says {index.offsets()[-1]}")
    quantiles = {
        name: at[lo] + weight * (at[hi] - at[lo]) for name, (lo, hi, weight) in wanted.items()
    }
    return entries, quantiles


# -- the verb ---------------------------------------------------------------------------------


def run_rank(config: RankConfig) -> pa.Table:
    """Rank every example; writes rank/ and returns the ends table (top and bottom rows)."""
    check_config(config)
    index = Index(config.index)
    total = int(index.offsets()[-1])
    k = max(config.top_k, config.top, 1)
    partitions = max(1, math.ceil(total / config.partition_rows)) if config.write_sorted else 1
    found, top, bottom = scan(index, k, partitions)
    sample = np.concatenate(found.sample) if found.sample else np.empty(0, np.float32)
    storage = index.storage
    old = set(storage.list(f"{RANK_DIR}/"))
    storage.delete(SUMMARY)  # no summary while the files it would list are being replaced
    entries: list[dict] = []
    quantiles = sample_quantiles(sample)
    if config.write_sorted and total:
        bounds = boundaries(sample, partitions)
        with tempfile.TemporaryDirectory(prefix="influence-ssl-rank-") as folder:
            spilled = spill(index, bounds, folder)
            parts = len(bounds) + 1
            entries, quantiles = sort_partitions(index, spilled, parts, total - found.nan)
            quantiles["from"] = "sorted"
    ends, end_rows = ends_table(index, top, bottom, total)
    storage.write_bytes(TOP, table_bytes(ends))
    refined = refine_top(index, ends, end_rows, config) if config.refine and total else None
    summary = {
        "rows": total,
        "order": "self_influence descending, key ascending; NaN last",
        "top_k": k,
        "partition_rows": config.partition_rows,
        "partitions": entries,
        "quantiles": quantiles,
        "histogram": found.histogram_json(),
    }
    if refined is not None:
        summary["refined"] = refined_summary(refined, config.refine)
    storage.write_bytes(SUMMARY, json.dumps(summary, indent=1).encode())
    kept = {SUMMARY, TOP} | ({REFINED} if refined is not None else set())
    storage.delete_many(sorted(old - kept - {e["file"] for e in entries}))
    shown = min(config.top, total)
    if refined is not None:
        print_refined(refined.slice(0, shown), summary["refined"])
    else:
        print_rows("highest self-influence", ends.slice(0, shown))
    print_rows("lowest self-influence", ends.slice(ends.num_rows - shown, shown))
    where = storage.url(SORTED_DIR) if entries else storage.url(TOP)
    print(f"{total:,} examples ranked ({len(entries)} sorted partitions) -> {where}")
    return ends


def sample_quantiles(sample: np.ndarray) -> dict:
    """Quantiles from the boundary sample (only where no sorted output is written)."""
    if not len(sample):
        return {"from": "sample"}
    values = sample.astype(np.float64)
    return {
        "median": float(np.quantile(values, 0.5)),
        "p99": float(np.quantile(values, 0.99)),
        "max": float(values.max()),
        "from": "sample",
    }


def ends_table(index: Index, top: Ends, bottom: Ends, total: int) -> tuple[pa.Table, np.ndarray]:
    """The rows of both ends (each once), in rank order, with their global rank; and their
    global row numbers in that order."""
    rows = np.unique(np.concatenate([top.rows, bottom.rows]))
    table = index.take(rows, COLUMNS).replace_schema_metadata(None)
    order = pc.sort_indices(table, sort_keys=SORT_KEYS)
    table, rows = table.take(order), rows[order.to_numpy()]
    position = np.arange(table.num_rows)
    rank = np.where(position < len(top.rows), position, total - (table.num_rows - position))
    return table.append_column("rank", pa.array(rank, pa.int64())), rows


# -- refinement of the top ----------------------------------------------------------------------


def refine_top(index: Index, ends: pa.Table, rows: np.ndarray, config: RankConfig) -> pa.Table:
    """The `refine_top` highest rows re-embedded with `refine` views, in the order of their
    refined self-influence ||w||^2 (descending, key ascending for ties); written to
    rank/refined.parquet with `rank` (the index's order) beside `refined_rank`."""
    from pipeline.refine import Refiner  # loads the model: only when asked

    head = min(config.refine_top, ends.num_rows)
    table = ends.slice(0, head)
    w, ok = Refiner(index, config.refine, config.device, config.model).rows(rows[:head])
    refined = (w.astype(np.float64) ** 2).sum(axis=1)
    table = table.append_column("refined_self_influence", pa.array(refined, pa.float64()))
    table = table.append_column("refined", pa.array(ok, pa.bool_()))
    order = pc.sort_indices(table, [("refined_self_influence", "descending"), ("key", "ascending")])
    table = table.take(order)
    table = table.append_column("refined_rank", pa.array(np.arange(head), pa.int64()))
    index.storage.write_bytes(REFINED, table_bytes(table))
    return table


def refined_summary(table: pa.Table, views: int) -> dict:
    """How much the refined order of the top moved from the index's."""
    stored = table.column("self_influence").to_numpy().astype(np.float64)
    refined = table.column("refined_self_influence").to_numpy()
    ranks = table.column("rank").to_numpy()
    top = min(20, len(ranks))
    return {
        "views": views,
        "rows": table.num_rows,
        "refined": int(pc.sum(table.column("refined")).as_py() or 0),
        "spearman_stored_refined": spearman(stored, refined),
        # Share of the refined top 20 that the index's top 20 holds too.
        "top20_kept": float(np.mean(ranks[:top] < top)),
        "file": REFINED,
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    # Imported here: the reliability module loads torch, which a plain rank never needs.
    from pipeline.influence.reliability import spearman as rank_correlation

    return rank_correlation(a, b) if len(a) > 1 else float("nan")


# -- reading the output -------------------------------------------------------------------------


def read_rank_summary(index: Index) -> dict | None:
    """rank/summary.json, or None where `rank` has not run (or ran before partitions)."""
    if not index.storage.exists(SUMMARY):
        return None
    return json.loads(index.storage.read_bytes(SUMMARY))


def _summary(index: Index) -> dict:
    summary = read_rank_summary(index)
    if summary is None:
        older = " (its output predates partitions)" if index.storage.exists(LEGACY) else ""
        raise FileNotFoundError(f"no rank output at {index.storage.url(RANK_DIR)}{older}: run rank")
    return summary


def read_rank_ends(index: Index, count: int | None = None) -> pa.Table:
    """The `count` highest and `count` lowest rows (each once, rank ascending; None: all of
    rank/top.parquet), read from top.parquet or, past its `top_k`, the sorted partitions."""
    summary = _summary(index)
    total, kept = summary["rows"], summary["top_k"]
    count = kept if count is None else count
    if count <= kept or total <= 2 * kept:
        table = read_columns(index.storage, TOP)
        rank = table.column("rank")
        near = pc.or_(pc.less(rank, count), pc.greater_equal(rank, total - count))
        return table.filter(near)
    if not summary["partitions"]:
        raise ValueError(f"rank kept {kept} rows of each end and no sorted output: rerun rank")
    wanted = np.unique(np.concatenate([np.arange(count), np.arange(total - count, total)]))
    return _sorted_rows(index, summary, wanted)


def _sorted_rows(index: Index, summary: dict, ranks: np.ndarray) -> pa.Table:
    pieces = []
    for entry in summary["partitions"]:
        first = entry["first_rank"]
        mine = ranks[(ranks >= first) & (ranks < first + entry["rows"])]
        if len(mine):
            pieces.append(read_rows(index.storage, entry["file"], mine - first))
    return pa.concat_tables(pieces)


def read_ranked(index: Index) -> pa.Table:
    """Every ranked row (all partitions, in rank order): for small indexes and tests."""
    summary = _summary(index)
    if not summary["partitions"]:
        raise ValueError("rank ran with write_sorted=false: only rank/top.parquet exists")
    return pa.concat_tables(read_columns(index.storage, e["file"]) for e in summary["partitions"])


def print_refined(rows: pa.Table, summary: dict) -> None:
    print(
        f"\nhighest self-influence, refined with {summary['views']} views ({summary['refined']} "
        f"of the top {summary['rows']} re-embedded; Spearman with the index's values "
        f"{summary['spearman_stored_refined']:.3f}):"
    )
    print(f"  {'refined':>8}  {'rank':>8}  {'refined s':>12}  {'index s':>12}  {'cls':>4}  key")
    for row in rows.to_pylist():
        cls = "" if row["cls"] is None else row["cls"]
        mark = "" if row["refined"] else "  (not refined: image unreadable)"
        print(
            f"  {row['refined_rank']:>8}  {row['rank']:>8}  {row['refined_self_influence']:>12.6g}"
            f"  {row['self_influence']:>12.6g}  {cls!s:>4}  {row['key']}{mark}"
        )


def print_rows(title: str, rows: pa.Table) -> None:
    print(f"\n{title}:")
    print(f"  {'rank':>8}  {'self_influence':>14}  {'loss':>8}  {'cls':>4}  key [shard]")
    for row in rows.to_pylist():
        cls = "" if row["cls"] is None else row["cls"]
        print(
            f"  {row['rank']:>8}  {row['self_influence']:>14.6g}  {row['loss']:>8.4f}  "
            f"{cls!s:>4}  {row['key']} [{row['shard'].rsplit('/', 1)[-1]}]"
        )
