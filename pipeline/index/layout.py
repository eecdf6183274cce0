"""Object names inside an output URI. One place, so writers and readers agree."""

from __future__ import annotations

MANIFEST = "manifest.json"
FACTORS = "factors/factors.safetensors"
SUMMARY = "stats/summary.json"


def part_path(shard_id: str) -> str:
    return f"parts/{shard_id}.parquet"


def marker_path(shard_id: str) -> str:
    """Written only after the part it vouches for: its presence means the shard is done."""
    return f"markers/{shard_id}.json"
