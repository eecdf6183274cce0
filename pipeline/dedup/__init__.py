"""`dedup`: duplicate groups and a keep/remove list, from an index alone (no model unless
refining; Ray only when asked for).

Two examples are near-duplicates when the cosine of their vectors is at least `tau`: the
index vectors `w` in "influence" mode (SPEC section 2), the unit representations `z` of the
un-augmented images in "embedding" mode (a SemDeDup-style baseline). With `exact`, rows with
the same decoded-pixel hash are joined as well. Groups are the connected components of that
graph, whose edges come from k-nearest-neighbour queries against the stored search index,
merged with a vectorised union-find over the rows in any edge. One member per group is kept
by the `keep` policy.

Writes, under the index: `dedup/<mode>/edges/<batch>.parquet` (+ a marker per batch: reruns
resume), `dedup/<mode>/list/<part>.parquet` (every row of that part: key, shard, group,
kept, reason, similarity, kept_key), `dedup/<mode>/groups.parquet` (grouped rows only) and
`dedup/<mode>.summary.json`.

Modules: config (settings), edges (batches against the search index), exact (pixel-hash
buckets), graph (union-find, keep policy, grouped rows), stream (the verb and its outputs),
memory (`dedup_table`, the in-memory path for small inputs), evaluate (scoring).
"""

from pipeline.dedup.config import (
    DEFAULT_REFINE,
    DEFAULT_TAU,
    KEEP_POLICIES,
    MODES,
    REASONS,
    VECTOR_COLUMN,
    DedupConfig,
    check_config,
)
from pipeline.dedup.edges import edge_batch, plan_batches
from pipeline.dedup.evaluate import evaluate_duplicates
from pipeline.dedup.exact import exact_edges
from pipeline.dedup.graph import components, group_ids, grouped_rows, keep_order
from pipeline.dedup.memory import dedup_table, hash_edges, near_edges, read_inputs, refined_edges
from pipeline.dedup.stream import (
    groups_path,
    list_part_path,
    print_summary,
    read_dedup_groups,
    read_keep_list,
    run_dedup,
    summarise,
    summary_path,
)

__all__ = [
    "DEFAULT_REFINE",
    "DEFAULT_TAU",
    "KEEP_POLICIES",
    "MODES",
    "REASONS",
    "VECTOR_COLUMN",
    "DedupConfig",
    "check_config",
    "components",
    "dedup_table",
    "edge_batch",
    "evaluate_duplicates",
    "exact_edges",
    "group_ids",
    "grouped_rows",
    "groups_path",
    "hash_edges",
    "keep_order",
    "list_part_path",
    "near_edges",
    "plan_batches",
    "print_summary",
    "read_dedup_groups",
    "read_inputs",
    "read_keep_list",
    "refined_edges",
    "run_dedup",
    "summarise",
    "summary_path",
]
