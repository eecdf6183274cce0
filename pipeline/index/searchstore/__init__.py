"""The stored search index: FAISS shards over a vector column of the parts (`w`, or `z`).

Layout under the index URI (`directory` is `search` for `w`)::

    search/manifest.json                       kind, metric, column, D, N, the parts covered,
                                               every file with its sha256
    search/<gen>-trained.faiss                 (IVF-PQ) principal map + coarse quantiser + PQ
                                               codebooks, stored once
    search/<gen>-shard-00000.faiss             (IVF-PQ) an IndexIVFPQ holding only codes and
                                               ids (its quantiser is an empty IndexFlatIP);
                                               (flat) a `pipeline.search.SearchIndex`
    search/<gen>-shard-00000-vectors-00000.npy (IVF-PQ) the shard's vectors in float16 (unit
                                               vectors for cosine), in blocks of bounded bytes
    search/<gen>-shard-00000-lists.npy         (IVF-PQ) each row's STORED_PROBES nearest lists
                                               (int32, best first), for searches of the
                                               index's own rows (dedup)
    search/<gen>-shard-00000-bounds.npy        (IVF-PQ, cosine) each row's residual norm and PQ
                                               error (float32 [rows, 2], `floor_bounds`):
                                               searches with a floor skip candidates they
                                               prove below it

`<gen>` names one build (a hash of the parts and settings): a rebuild writes new files, then
the manifest, then removes the previous build's files, so readers never mix builds.

Rows are numbered 0..N-1 in the index's part order. A search shard is a contiguous run of
whole parts of about `shard_rows` vectors. IVF-PQ is trained once, on whole row groups sampled
(seeded) across the parts, in the space of the top `reduce_dim` principal directions; every
shard is encoded with that one quantiser and codebook, so scores compare across shards and
a query's top-k is the merge of each shard's re-ranked top-k. Shards are built in parallel
(`map_fn`, one shard's vector block at a time per worker).

Searching (`SearchStore`): the principal map and the coarse quantiser run once per query
batch (for the index's own rows, as dedup queries, their stored lists replace the quantiser);
every shard then scans the same lists, in parallel threads, its inverted lists memory-mapped
from the `.faiss` file (FAISS's own format, IO_FLAG_MMAP): FAISS's scan (`search_preassigned`)
for few queries a list, list by list for batches (`scan_by_list`: each list decoded once, one
matrix product with its queries). Each shard re-ranks its candidates exactly against its
float16 blocks: queries in the order of their nearest list, each distinct candidate of a step
read once with pread (not a memory map: see BlockReader), so resident memory does not grow
with the rows touched, and scored with FAISS's inner products by index.
On S3, files are first copied to a local cache named by their sha256 (`cache_path`); every
file is checked against the sha256 in the manifest before FAISS reads it (a download, or a
local file on first load).
"""

from pipeline.index.searchstore.build import build_search_index, sample_row_groups
from pipeline.index.searchstore.layout import (
    CANDIDATES_PER_RESULT,
    SEARCH_MANIFEST,
    STORED_PROBES,
    StaleSearchIndexError,
    check_current,
    files_of,
    parts_of,
    plan_shards,
    read_search_manifest,
    resolve_kind,
    search_config_of,
)
from pipeline.index.searchstore.store import (
    SearchStore,
    Trained,
    brute_force_top_k,
    default_nprobe,
    merge_top_k,
)

__all__ = [
    "CANDIDATES_PER_RESULT",
    "SEARCH_MANIFEST",
    "STORED_PROBES",
    "SearchStore",
    "StaleSearchIndexError",
    "Trained",
    "brute_force_top_k",
    "build_search_index",
    "check_current",
    "default_nprobe",
    "files_of",
    "merge_top_k",
    "parts_of",
    "plan_shards",
    "read_search_manifest",
    "resolve_kind",
    "sample_row_groups",
    "search_config_of",
]
