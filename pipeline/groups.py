"""`groups`: how influence is distributed across groups named in the metadata (or `cls`).

The field: `field=` names it; by default `cls` where the index has it, else the metadata
field of the first part with the most distinct values within 2..max_groups (printed). A
field no row has is refused, listing the fields the first part has.

Per group (`groups/<field>.stats.parquet`): count and share of the corpus; self-influence
mean and max (exact), median and p90 (exact for a group of at most RESERVOIR = 100,000 rows,
else of a seeded uniform sample of 100,000 of its rows); mean loss; and the group's share of
the top-influence examples (the ceil(top_fraction N) highest self-influence, ties by row
order) with its ratio to the group's corpus share (> 1: over-represented).

Group-by-group matrix (`groups/<field>.matrix.parquet`, long format). The mean influence of
group h's examples on group g's,

    M[g, h] = 1/(|g||h|) sum_{t in g} sum_{s in h} <w_t, w_s> = <mean_g w, mean_h w>,

is exact by bilinearity of the inner product, so it needs only the per-group sums of `w`
(one O(N D) pass over the parts, O(G D) memory), never the |g| x |h| pairs. The mean
normalised influence (cosine) is the same with unit vectors u = w / ||w||. The diagonal
includes the pairs (t, t) (self-influence), as the formula does. With `sample`, only the
sampled rows' w are read (the row groups holding them).

Streaming, part by part, in memory bounded by one part and the groups, never by N:
1. each part's group labels (the `meta.<field>` column where the part stores it, else its
   `metadata` JSON, parsed part by part) and self_influence: value counts (bounded by the
   distinct values: at most MAX_DISTINCT) and a histogram of the high 16 bits of the
   self-influence order key; labels, self_influence and loss go to a local spill file.
2. from the spill: per-group count, sums, max and reservoirs; the low 16 bits' histogram
   inside the threshold bin, so the top-influence threshold is exact (a radix select).
3. from the spill and `w`: top-influence counts per group; per-group sums of w and unit w.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.index.columnar import open_parquet, read_rows
from pipeline.index.layout import GROUPS_DIR
from pipeline.index.parts import META_PREFIX, group_value, stored_meta_fields, vectors
from pipeline.index.reader import Index
from pipeline.index.scan import iter_read
from pipeline.rank import order_key
from pipeline.search import l2_normalize
from pipeline.storage import safe_name

MISSING = "(missing)"
OTHER = "(other)"  # parenthesised, like MISSING, so it cannot clash with a real value
RESERVOIR = 100_000  # values per group kept for the median and p90 (400 kB each)
MAX_DISTINCT = 1_000_000  # distinct values counted in pass 1 (an id-like field is refused)
CHUNK_ROWS = 4096  # rows of w summed at a time in float64
BINS = 1 << 16
FIELD_SAMPLE_ROWS = 10_000  # rows of the first part whose values describe its fields


class GroupsError(UserError, ValueError):
    """A field to group by that the index does not have, or settings out of range."""


@dataclass
class GroupsConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    # A metadata field name, or "cls". None: `cls` where the index has it, else the first
    # part's metadata field with the most distinct values in 2..max_groups (printed).
    field: str | None = None
    top_fraction: float = 0.01  # "top-influence examples": this fraction by self-influence
    max_groups: int = 50  # the most frequent groups; the rest are lumped as OTHER
    sample: int = 0  # rows for the matrix: 0 all (exact, O(N D)); else a seeded sample
    seed: int = 0  # of the matrix sample (and of the median/p90 reservoirs)
    top: int = 20  # groups to print


def check_config(config: GroupsConfig) -> None:
    if not 0 < config.top_fraction <= 1:
        raise GroupsError(f"top_fraction must lie in (0, 1], got {config.top_fraction}")
    if config.max_groups < 1 or config.sample < 0:
        raise GroupsError("max_groups must be >= 1 and sample >= 0")


# -- group labels ------------------------------------------------------------------------


def part_labels(
    index: Index, path: str, field: str, columns: list[str]
) -> tuple[pa.Array, pa.Table]:
    """The field of every row of one part as a group name (null where the row lacks it):
    from its `cls` or `meta.<field>` column, else from its `metadata` JSON; and `columns`
    of the part, read with it (one footer, coalesced ranges)."""
    with open_parquet(index.storage, path) as file:
        schema = file.schema_arrow
        source = "cls" if field == "cls" else META_PREFIX + field
        stored = stored_meta_fields(schema)
        if source not in schema.names and field != "cls":
            absent = stored is not None and stored[1] is not None and field not in stored[1]
            source = None if absent else "metadata"  # None: no row of the part has it
        table = file.read(columns + ([source] if source else []))
    if source is None:
        return pa.nulls(table.num_rows, pa.string()), table
    column = table.column(source).combine_chunks()
    if source == "cls":
        return pc.cast(column, pa.string()), table
    if source == "metadata":
        texts = column.to_pylist()
        values = [group_value(json.loads(t).get(field)) if t else None for t in texts]
        return pa.array(values, pa.string()), table
    return column, table


@dataclass
class Groups:
    """The group names (the `max_groups` most frequent values, ties by name, then MISSING
    and OTHER where present) and how labels map to their numbers."""

    names: list[str]

    @classmethod
    def from_counts(cls, counts: dict[str, int], missing: int, max_groups: int) -> Groups:
        ranked = sorted(counts, key=lambda v: (-counts[v], v))
        names = ranked[:max_groups]
        if missing:
            names.append(MISSING)
        if len(ranked) > max_groups:
            names.append(OTHER)
        return cls(names)

    def ids(self, labels: pa.Array) -> np.ndarray:
        """Per row its group number (labels outside the named groups: OTHER)."""
        number = {name: g for g, name in enumerate(self.names)}
        other, missing = number.get(OTHER, -1), number.get(MISSING, -1)
        encoded = labels.dictionary_encode()
        values = encoded.dictionary.to_pylist()
        lookup = np.array([number.get(v, other) for v in values] + [missing], np.int64)
        return lookup[encoded.indices.fill_null(len(values)).to_numpy()]


# -- statistics ---------------------------------------------------------------------------


class Reservoir:
    """One group's values: all of them up to `size`, then a uniform sample of `size`
    (Algorithm R, vectorised: later replacements of a slot win, as in sequence)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.values = np.empty(0, np.float32)
        self.seen = 0

    def add(self, values: np.ndarray) -> None:
        room = max(0, self.size - len(self.values))
        if room:
            self.values = np.concatenate([self.values, values[:room]])
        rest = values[room:]
        if len(rest):
            seen = self.seen + room + np.arange(1, len(rest) + 1)  # 1-based positions
            slot = np.floor(self.rng.random(len(rest)) * seen).astype(np.int64)
            accept = np.flatnonzero(slot < self.size)
            slot, accept = slot[accept], accept
            last = len(slot) - 1 - np.unique(slot[::-1], return_index=True)[1]
            self.values[slot[last]] = rest[accept[last]]
        self.seen += len(values)


class Stats:
    """Per-group sums (float64), max, and reservoirs, accumulated part by part."""

    def __init__(self, groups: int, seed: int) -> None:
        self.count = np.zeros(groups, np.int64)
        self.s_sum = np.zeros(groups)
        self.loss_sum = np.zeros(groups)
        self.s_max = np.full(groups, -np.inf)
        rng = np.random.default_rng(seed)
        self.reservoirs = [Reservoir(RESERVOIR, rng) for _ in range(groups)]

    def add(self, ids: np.ndarray, s: np.ndarray, loss: np.ndarray) -> None:
        groups = len(self.count)
        self.count += np.bincount(ids, minlength=groups)
        self.s_sum += np.bincount(ids, s.astype(np.float64), minlength=groups)
        self.loss_sum += np.bincount(ids, loss.astype(np.float64), minlength=groups)
        with np.errstate(invalid="ignore"):  # NaN propagates into the max, as numpy's max
            np.maximum.at(self.s_max, ids, s.astype(np.float64))
        order = np.argsort(ids, kind="stable")  # row order kept within each group
        starts = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=groups))])
        for g in np.flatnonzero(np.diff(starts)):
            self.reservoirs[g].add(s[order[starts[g] : starts[g + 1]]])

    def table(self, names: list[str], top_counts: np.ndarray, top_count: int) -> pa.Table:
        n = int(self.count.sum())
        rows = []
        for g, name in enumerate(names):
            values = self.reservoirs[g].values.astype(np.float64)
            share = self.count[g] / n
            top_share = top_counts[g] / top_count
            rows.append(
                {
                    "group": name,
                    "count": int(self.count[g]),
                    "share": float(share),
                    "self_influence_mean": float(self.s_sum[g] / self.count[g]),
                    "self_influence_median": float(np.median(values)),
                    "self_influence_p90": float(np.percentile(values, 90)),
                    "self_influence_max": float(self.s_max[g]),
                    "loss_mean": float(self.loss_sum[g] / self.count[g]),
                    "top_count": int(top_counts[g]),
                    "top_share": float(top_share),
                    "top_ratio": float(top_share / share),
                }
            )
        return pa.Table.from_pylist(rows)


def select(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, count in the bins above it) of a histogram of keys."""
    descending = np.cumsum(histogram[::-1])
    i = int(np.searchsorted(descending, k))
    b = len(histogram) - 1 - i
    return b, int(descending[i] - histogram[b])


def group_means(labels: np.ndarray, w: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums of w and of unit w, [G, D] float64 each (a one-hot product, in chunks
    of CHUNK_ROWS rows so the float64 copy stays small)."""
    sums = np.zeros((groups, w.shape[1]))
    unit_sums = np.zeros((groups, w.shape[1]))
    for start in range(0, len(labels), CHUNK_ROWS):
        ids, chunk = labels[start : start + CHUNK_ROWS], w[start : start + CHUNK_ROWS]
        onehot = np.zeros((groups, len(ids)))
        onehot[ids, np.arange(len(ids))] = 1.0
        sums += onehot @ chunk.astype(np.float64)
        unit_sums += onehot @ l2_normalize(chunk).astype(np.float64)
    return sums, unit_sums


def matrix_table(names: list[str], sums: np.ndarray, unit_sums: np.ndarray, counts: np.ndarray):
    """Long-format matrix: every (group_a, group_b) with the mean influence and cosine."""
    safe = np.maximum(counts, 1)[:, None]
    mean_w, mean_u = sums / safe, unit_sums / safe
    influence, cosine = mean_w @ mean_w.T, mean_u @ mean_u.T
    a, b = np.meshgrid(np.arange(len(names)), np.arange(len(names)), indexing="ij")
    a, b = a.ravel(), b.ravel()
    return pa.table(
        {
            "group_a": pa.array([names[i] for i in a], pa.string()),
            "group_b": pa.array([names[i] for i in b], pa.string()),
            "count_a": pa.array(counts[a], pa.int64()),
            "count_b": pa.array(counts[b], pa.int64()),
            "mean_influence": pa.array(influence[a, b]),
            "mean_cosine": pa.array(cosine[a, b]),
        }
    )


# -- the passes ---------------------------------------------------------------------------


class Spill:
    """Per part, its labels, self_influence and loss in a local Parquet file (passes 2, 3)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def path(self, number: int) -> str:
        return os.path.join(self.folder, f"part-{number:06d}.parquet")

    def write(self, number: int, labels: pa.Array, s: pa.Array, loss: pa.Array) -> None:
        table = pa.table({"label": labels, "self_influence": s, "loss": loss})
        pq.write_table(table, self.path(number), compression="lz4")

    def read(self, number: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        table = pq.read_table(self.path(number))
        s = table.column("self_influence").to_numpy().astype(np.float32, copy=False)
        loss = table.column("loss").to_numpy().astype(np.float32, copy=False)
        return table.column("label").combine_chunks(), s, loss


def count_labels(
    index: Index, config: GroupsConfig, spill: Spill
) -> tuple[dict[str, int], int, np.ndarray]:
    """Pass 1: value counts, missing rows, and the high-16-bit histogram of the order keys."""
    counts: dict[str, int] = {}
    missing = 0
    high = np.zeros(BINS, np.int64)

    def read(_: int, entry: dict) -> tuple[pa.Array, pa.Table]:
        return part_labels(index, entry["part"], config.field, ["self_influence", "loss"])

    for part in iter_read(index, read):
        labels, table = part.table
        s = table.column("self_influence").combine_chunks()
        spill.write(part.number, labels, s, table.column("loss").combine_chunks())
        missing += labels.null_count
        for item in pc.value_counts(labels.drop_null()).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        if len(counts) > MAX_DISTINCT:
            raise GroupsError(
                f"{config.field!r} has more than {MAX_DISTINCT:,} distinct values: groups are "
                "for fields with few values (a class, a source, a split); choose another field"
            )
        high += np.bincount(order_key(s.to_numpy()) >> 16, minlength=BINS)
    return counts, missing, high


def accumulate_stats(
    index: Index, groups: Groups, spill: Spill, high_bin: int, seed: int
) -> tuple[Stats, np.ndarray]:
    """Pass 2: per-group statistics; the low-16-bit histogram inside the threshold bin."""
    stats = Stats(len(groups.names), seed)
    low = np.zeros(BINS, np.int64)
    for number in range(len(index.manifest["shards"])):
        labels, s, loss = spill.read(number)
        stats.add(groups.ids(labels), s, loss)
        keys = order_key(s)
        low += np.bincount(keys[keys >> 16 == high_bin] & 0xFFFF, minlength=BINS)
    return stats, low


def sampled_rows(index: Index, config: GroupsConfig) -> list[np.ndarray] | None:
    """Per part the (sorted, local) rows of a seeded uniform sample of `config.sample`
    rows without replacement, or None for all rows. Memory: the sample."""
    counts = np.diff(index.offsets())
    if not config.sample or config.sample >= counts.sum():
        return None
    rng = np.random.default_rng(config.seed)
    per_part = rng.multivariate_hypergeometric(counts, config.sample)
    return [np.sort(rng.choice(n, k, replace=False)) for n, k in zip(counts, per_part, strict=True)]


def accumulate_sums(
    index: Index, groups: Groups, spill: Spill, threshold: tuple[int, int], config: GroupsConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pass 3: top-influence counts per group (rows above the threshold key, and the first
    `ties` rows at it in row order), and the sums of w and unit w (over the sample)."""
    count = len(groups.names)
    key_cut, ties = threshold
    chosen = sampled_rows(index, config)
    dim = index.dimension
    sums, unit_sums = np.zeros((count, dim)), np.zeros((count, dim))
    counts, top_counts = np.zeros(count, np.int64), np.zeros(count, np.int64)

    def read(number: int, entry: dict) -> np.ndarray | None:
        rows = None if chosen is None else chosen[number]
        if rows is not None and not len(rows):
            return None
        if rows is None:
            return vectors(index.read_part(entry["part"], ["w"]))
        return vectors(read_rows(index.storage, entry["part"], rows, ["w"]))

    for part in iter_read(index, read, window=2):
        labels, s, _ = spill.read(part.number)
        ids = groups.ids(labels)
        keys = order_key(s)
        top = keys > key_cut
        at = np.flatnonzero(keys == key_cut)[:ties]
        top[at] = True
        ties -= len(at)
        top_counts += np.bincount(ids[top], minlength=count)
        if part.table is None:
            continue
        if chosen is not None:
            ids = ids[chosen[part.number]]
        s_w, s_u = group_means(ids, part.table, count)
        sums += s_w
        unit_sums += s_u
        counts += np.bincount(ids, minlength=count)
    return sums, unit_sums, counts, top_counts


# -- which field ------------------------------------------------------------------------------


def first_part_fields(index: Index) -> dict[str, tuple[int, int]]:
    """{field: (distinct values, rows with a value)} among the first part's first
    FIELD_SAMPLE_ROWS rows, for `cls` and every metadata field there (its `meta.*` columns,
    or its JSON for an older part); (0, 0) for a field seen but not stored as a column."""
    with open_parquet(index.storage, index.manifest["shards"][0]["part"]) as file:
        names = file.schema_arrow.names
        meta = [n for n in names if n.startswith(META_PREFIX)]
        record = stored_meta_fields(file.schema_arrow)
        columns = ["cls"] + (meta if record is not None else ["metadata"])
        table = file.read([c for c in columns if c in names]).slice(0, FIELD_SAMPLE_ROWS)
    found = {}
    for name in table.column_names:
        if name == "metadata":
            found.update(json_fields(table.column(name).to_pylist()))
            continue
        values = table.column(name).drop_null()
        if len(values):
            found[name.removeprefix(META_PREFIX)] = (len(pc.unique(values)), len(values))
    if record is not None and record[1] is not None:  # fields seen but not stored as columns
        found.update({name: (0, 0) for name in record[1] if name not in found})
    return found


def json_fields(texts: list[str | None]) -> dict[str, tuple[int, int]]:
    values: dict[str, list[str]] = {}
    for text in texts:
        for name, value in (json.loads(text) if text else {}).items():
            if value is not None:
                values.setdefault(name, []).append(json.dumps(value, sort_keys=True))
    return {name: (len(set(seen)), len(seen)) for name, seen in values.items()}


def choose_field(fields: dict[str, tuple[int, int]], max_groups: int) -> str | None:
    """`cls` if present, else the field with the most distinct values in 2..max_groups and
    fewer than its rows (an id has one per row, a constant one), else any field with values."""
    if fields.get("cls", (0, 0))[0]:
        return "cls"
    fitting = [n for n, (d, rows) in fields.items() if 2 <= d <= max_groups and d < rows]
    if fitting:
        return max(sorted(fitting), key=lambda n: fields[n][0])
    present = sorted((d >= rows > 1, n) for n, (d, rows) in fields.items() if d)  # ids last
    return present[0][1] if present else None


def resolve_field(index: Index, config: GroupsConfig) -> GroupsConfig:
    """`config` with its field chosen (and printed) when not given."""
    if config.field is not None:
        return config
    fields = first_part_fields(index)
    chosen = choose_field(fields, config.max_groups)
    if chosen is None:
        raise GroupsError(
            f"nothing to group by at {index.storage.uri}: no row has `cls` and the first "
            "part has no metadata field; write shards with a .cls or .json per sample"
        )
    if chosen != "cls":
        others = ", ".join(sorted(set(fields) - {chosen})) or "none"
        print(
            f"groups: the index has no `cls`; grouping by {chosen!r} ({fields[chosen][0]} value(s) "
            f"in the first part; other fields: {others}); set field=... to choose"
        )
    return dataclasses.replace(config, field=chosen)


def missing_field(index: Index, field: str) -> GroupsError:
    """The error for a field no row has: the fields there are, the closest first."""
    fields = sorted(first_part_fields(index))
    close = difflib.get_close_matches(field, fields, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(fields) if fields else "none"
    return GroupsError(
        f"no row of the index at {index.storage.uri} has the field {field!r}{guess}; the "
        f"first part has: {listed}; set field=<one of them>"
    )


# -- the verb -----------------------------------------------------------------------------


def run_groups(config: GroupsConfig) -> tuple[pa.Table, pa.Table]:
    """Statistics and the group-by-group matrix over `config.field`; written and printed."""
    check_config(config)
    index = Index(config.index)
    config = resolve_field(index, config)
    total = int(index.offsets()[-1])
    with tempfile.TemporaryDirectory(prefix="influence-ssl-groups-") as folder:
        spill = Spill(folder)
        counts, missing, high = count_labels(index, config, spill)
        if not counts:
            raise missing_field(index, config.field)
        groups = Groups.from_counts(counts, missing, config.max_groups)
        top_count = max(1, math.ceil(config.top_fraction * total))
        high_bin, above = select(high, top_count)
        stats, low = accumulate_stats(index, groups, spill, high_bin, config.seed)
        low_bin, above_low = select(low, top_count - above)
        cut = (high_bin << 16) | low_bin
        ties = top_count - above - above_low
        sums, unit_sums, sampled, top_counts = accumulate_sums(
            index, groups, spill, (cut, ties), config
        )
    stats_table = stats.table(groups.names, top_counts, top_count)
    matrix = matrix_table(groups.names, sums, unit_sums, sampled)
    name = safe_name(config.field)
    stats_url = index.write_table(f"{GROUPS_DIR}/{name}.stats.parquet", stats_table)
    matrix_url = index.write_table(f"{GROUPS_DIR}/{name}.matrix.parquet", matrix)
    print_stats(stats_table, config)
    print(f"group statistics -> {stats_url}\ngroup-by-group matrix -> {matrix_url}")
    return stats_table, matrix


def print_stats(stats: pa.Table, config: GroupsConfig) -> None:
    print(
        f"groups over {config.field!r}: {stats.num_rows} groups; top-influence examples = "
        f"the top {config.top_fraction:.2%} by self-influence"
    )
    print(
        f"  {'group':>16} {'count':>8} {'share':>7} {'mean s':>10} {'p90 s':>10} {'top/share':>9}"
    )
    for row in stats.slice(0, config.top).to_pylist():
        print(
            f"  {row['group'][:16]:>16} {row['count']:>8,} {row['share']:>7.2%} "
            f"{row['self_influence_mean']:>10.4g} {row['self_influence_p90']:>10.4g} "
            f"{row['top_ratio']:>9.2f}"
        )
