"""Object names inside an output URI. One place, so writers and readers agree."""

from __future__ import annotations

MANIFEST = "manifest.json"
FACTORS = "factors/factors.safetensors"
SUMMARY = "stats/summary.json"
LEASE = "lease.json"  # one writer per output (index/lease.py)


def part_path(shard_id: str) -> str:
    return f"parts/{shard_id}.parquet"


def marker_path(shard_id: str) -> str:
    """Written only after the part it vouches for: its presence means the shard is done."""
    return f"markers/{shard_id}.json"


def retry_path(shard_id: str) -> str:
    """Beside a marker: the shard was missing when built, so a rerun tries it again."""
    return f"markers/{shard_id}.retry"


# Outputs of the offline verbs, beside the parts (SPEC section 4).
SEARCH_DIR = "search"  # search/manifest.json + search/shard-00000.faiss ...
KEYS_DIR = "keys"  # keys/manifest.json + keys/<generation>-bucket-00000.parquet ...
RANK_DIR = "rank"  # rank/summary.json, rank/top.parquet, rank/sorted/part-00000.parquet ...
# dedup/<mode>/list/<part>.parquet (keep/remove list), dedup/<mode>/groups.parquet, edges/,
# dedup/<mode>.summary.json
DEDUP_DIR = "dedup"
GROUPS_DIR = "groups"  # groups/<field>.stats.parquet, .share.parquet, .matrix.parquet
QUERY_DIR = "query"  # query/results.parquet (the last `query` asked to keep its results)
REPORT_DIR = "report"  # report/index.html + report/*.png
