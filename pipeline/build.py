"""`build`: stream every shard once into w(x) and s(x); one Parquet part + marker per shard.

A shard with a marker is finished and skipped, so a rerun after a crash processes only what
is missing and the final index equals a clean run's. The manifest and the merged run
statistics are rewritten from the markers at the end of every run.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import PipelineConfig
from pipeline.data import ReadStats, shard_id
from pipeline.errors import UserError
from pipeline.fit import Driver, totals
from pipeline.index.keys import build_key_lookup
from pipeline.index.layout import FACTORS, SUMMARY, marker_path, retry_path
from pipeline.index.lease import hold_lease
from pipeline.index.manifest import check_compatible, read_manifest, write_manifest
from pipeline.index.parts import read_marker
from pipeline.index.reader import Index
from pipeline.index.searchstore import build_search_index
from pipeline.influence.reliability import describe as describe_reliability
from pipeline.runtime.pool import Task, WorkerPool, connect
from pipeline.runtime.progress import Progress
from pipeline.runtime.search_service import cluster_map
from pipeline.storage import open_storage

log = logging.getLogger(__name__)


class NotFittedError(UserError, FileNotFoundError):
    """`build` into an output that `fit` has not written factors to."""


def run_build(config: PipelineConfig) -> dict:
    # Checked before the model is built or the lease taken: a build before fit writes nothing.
    require_factors(read_manifest(open_storage(config.output)), config.output)
    driver = Driver(config)
    with hold_lease(driver.output, "build", config.force):  # one writer per output
        return build_under_lease(driver, config)


def require_factors(manifest: dict | None, output: str) -> dict:
    if manifest is None or not manifest.get("factors"):
        raise NotFittedError(
            f"no fitted factors under {output}: `build` embeds with the factors `fit` writes; "
            f"run `influence-ssl fit --out {output} --shards ...` first (same settings)"
        )
    return manifest


def build_under_lease(driver: Driver, config: PipelineConfig) -> dict:
    manifest = require_factors(read_manifest(driver.output), driver.output.uri)
    check_compatible(manifest, driver.fingerprint, "build into this index")
    shards = list(dict.fromkeys(driver.shards))
    listed = set(driver.output.list("markers/"))  # one listing, not a request per shard
    todo = [url for url in shards if not is_done(shard_id(url), listed)]
    print(
        f"build: {len(shards) - len(todo)} of {len(shards)} shards already done, "
        f"{len(todo)} to process",
        flush=True,
    )
    progress = Progress("build", len(todo), enabled=config.progress)
    failures: list[dict] = []
    restarts = 0
    fresh: dict[str, dict] = {}  # this run's markers, as the workers returned them

    def collect(task: Task, marker: dict) -> None:
        fresh[task.label] = shard_entry(marker)
        progress.update(marker["examples"])

    if todo:
        connect(config.runtime)
        pool = WorkerPool(config)
        try:
            # Read once here, put into the object store once, loaded by every worker at once.
            pool.broadcast("load_factors", driver.output.read_bytes(FACTORS))
            outcome = pool.run([Task("build_shard", (url,), url) for url in todo], collect)
        finally:
            progress.close()  # short of the total when shards failed
            pool.shutdown()
        failures = [{"shard": task.label, "error": error} for task, error in outcome.failures]
        restarts = outcome.restarts
    known = known_entries(driver.output, manifest, shards, listed, fresh)
    summary = summarise(shards, known, failures, progress.rate if todo else 0.0)
    summary["worker_restarts_this_run"] = restarts
    summary["reliability"] = manifest.get("reliability") or {}
    manifest["shards"] = summary.pop("shards")
    manifest["stats"] = summary
    write_manifest(driver.output, manifest)
    driver.output.write_bytes(SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
    print_summary(summary, driver.output.uri)
    for line in describe_reliability(manifest.get("reliability") or {}):
        print(line, flush=True)
    if summary["examples"]:
        build_key_lookup(Index(config.output))  # skipped when it covers the parts
        search_map = cluster_map(config.runtime)  # shards built as Ray tasks
        build_search_index(
            Index(config.output), config.index.search, map_fn=search_map, progress=config.progress
        )
    return summary


def is_done(shard: str, listed: set[str]) -> bool:
    """Marked done, and not a shard that was missing then (those are tried again)."""
    return marker_path(shard) in listed and retry_path(shard) not in listed


def shard_entry(marker: dict) -> dict:
    """A shard's line in the manifest, from its marker: where its part is, what it read."""
    digest = marker["read"].get("shards", {}).get(marker["shard"], {})
    return {
        "url": marker["shard"],
        "id": marker["shard_id"],
        "examples": marker["examples"],
        "part": marker["part"],
        "part_sha256": marker["part_sha256"],
        "shard_sha256": digest.get("sha256"),
        "shard_bytes": digest.get("size"),
        "shard_complete": digest.get("complete"),
        "read": totals(ReadStats.from_dict(marker["read"])),
        "seconds": marker["seconds"],
    }


def known_entries(storage, manifest: dict, shards: list[str], listed: set, fresh: dict) -> dict:
    """Every finished shard's entry: this run's from the results in hand, earlier runs' from
    the manifest; markers are read only for shards done but not yet in the manifest (a run
    that stopped before writing it) or written by an older version without read counts."""
    known = {
        e["url"]: e
        for e in manifest.get("shards", [])
        if "read" in e and is_done(shard_id(e["url"]), listed)
    }
    known.update(fresh)
    unknown = [u for u in shards if u not in known and marker_path(shard_id(u)) in listed]
    # Independent small GETs: overlap them.
    with ThreadPoolExecutor(max_workers=16) as pool:
        markers = list(pool.map(lambda url: read_marker(storage, shard_id(url)), unknown))
    for marker in markers:
        if marker is not None:
            known[marker["shard"]] = shard_entry(marker)
    return known


def summarise(shards: list[str], known: dict, failures: list[dict], rate: float) -> dict:
    """Merged statistics over every finished shard (linear in the shards); failures and
    missing listed."""
    read, entries, missing = ReadStats(), [], []
    seconds = 0.0
    for url in shards:
        entry = known.get(url)
        if entry is None:
            missing.append(url)
            continue
        read += ReadStats.from_dict(entry["read"])
        seconds += entry["seconds"]
        entries.append(entry)
    examples = sum(e["examples"] for e in entries)
    return {
        "shards": entries,
        "shards_done": len(entries),
        "shards_total": len(shards),
        "shards_missing": missing,
        "failed": failures,
        "examples": examples,
        "read": totals(read),
        "worker_seconds": round(seconds, 3),
        "examples_per_worker_second": round(examples / seconds, 2) if seconds else 0.0,
        "examples_per_second_this_run": round(rate, 2),
        "factors": FACTORS,
    }


def print_summary(summary: dict, uri: str) -> None:
    skipped = summary["read"].get("skipped", {})
    print(
        f"index at {uri}: {summary['examples']:,} examples in {summary['shards_done']}/"
        f"{summary['shards_total']} shards; skipped {sum(skipped.values())} "
        f"{dict(skipped) if skipped else ''}".rstrip(),
        flush=True,
    )
    for failure in summary["failed"]:
        print(f"FAILED {failure['shard']}: {failure['error']}", flush=True)
