"""`fit`: stream a sample of shards, fit the projected curvature, write factors and manifest.

Each curvature pass is one round over the sample: workers return partial statistics per
shard, the driver merges them in shard order (so the factors do not depend on how many
workers ran or which finished first), completes the pass and ships the result to the
workers for the next pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random

from pipeline.config import FitConfig, PipelineConfig
from pipeline.data import ReadStats, expand_shards
from pipeline.index.layout import FACTORS, MANIFEST
from pipeline.index.lease import hold_lease
from pipeline.index.manifest import (
    IndexMismatchError,
    differences,
    fingerprint,
    new_manifest,
    read_manifest,
    write_manifest,
)
from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.reliability import describe as describe_reliability
from pipeline.influence.statistics import Statistics
from pipeline.models import model_identity
from pipeline.runtime.pool import Task, WorkerPool, connect
from pipeline.runtime.progress import Progress
from pipeline.runtime.worker import build_model
from pipeline.storage import open_storage, read_uri

log = logging.getLogger(__name__)


def sample_shards(shards: list[str], fit: FitConfig) -> list[str]:
    """All shards, or a seeded sample of `fit.max_shards` of them (in corpus order)."""
    if not fit.max_shards or fit.max_shards >= len(shards):
        return list(shards)
    chosen = set(random.Random(fit.seed).sample(range(len(shards)), fit.max_shards))
    return [s for i, s in enumerate(shards) if i in chosen]


class Driver:
    """What `fit` and `build` share on the driver: output, model identity, fingerprint."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.output = open_storage(config.output)
        model = config.influence.model
        encoder = build_model(model)
        # The driver only merges statistics and decomposes them: the CPU is enough.
        self.engine = InfluenceSSL(encoder, dataclasses.replace(config.influence, device="cpu"))
        self.model = model_identity(encoder, model, open_uri=read_uri)
        self.layers = [layer.describe() for layer in self.engine.tracker.layers]
        self.fingerprint = fingerprint(config, self.model, self.layers)
        self.shards = expand_shards(config.input.shards)


def run_fit(config: PipelineConfig) -> dict:
    driver = Driver(config)
    with hold_lease(driver.output, "fit", config.force):  # one writer per output
        return fit_under_lease(driver, config)


def fit_under_lease(driver: Driver, config: PipelineConfig) -> dict:
    existing = read_manifest(driver.output)
    if existing is not None:
        changed = differences(driver.fingerprint, existing["fingerprint"])
        if not changed and existing.get("factors") and not config.overwrite:
            print(f"factors already fitted in {driver.output.url(FACTORS)}; nothing to do")
            return existing
        if changed and not config.overwrite:
            raise IndexMismatchError(
                f"{driver.output.url(MANIFEST)} holds an index built with other settings "
                "(set overwrite=true to replace it):\n  " + "\n  ".join(changed)
            )
        clear_index(driver.output)

    sample = sample_shards(driver.shards, config.fit)
    connect(config.runtime)
    pool = WorkerPool(config)
    try:
        fitted = fit_passes(driver.engine, pool, sample)
        reliability = check_reliability(driver.engine, pool, fitted["shards"], config.fit)
    finally:
        pool.shutdown()

    factors = driver.engine.factors_bytes()
    driver.output.write_bytes(FACTORS, factors)
    manifest = new_manifest(config, driver.model, driver.layers, driver.engine.dimension)
    manifest["factors"] = {
        "path": FACTORS,
        "sha256": hashlib.sha256(factors).hexdigest(),
        "curvature": driver.engine.curvature.kind,
        "damping": damping_values(driver.engine),
        **fitted,
    }
    manifest["reliability"] = reliability
    write_manifest(driver.output, manifest)
    print(
        f"fitted {driver.engine.curvature.kind} factors on {fitted['examples']:,} examples "
        f"from {len(fitted['shards'])} shards -> {driver.output.url(FACTORS)}"
    )
    warn_if_short(fitted["examples"], driver.engine)
    for line in describe_reliability(reliability):
        print(line, flush=True)
    return manifest


def check_reliability(engine: InfluenceSSL, pool: WorkerPool, shards: list[str], fit) -> dict:
    """w of a fixed sample (the first examples of the fit shards) from two independent view
    sets, compared on one worker with the final factors."""
    if not fit.reliability_sample or not shards:
        return {}
    state = {k: v.cpu() for k, v in engine.curvature.state_dict().items()}
    pool.broadcast("load_curvature", state, list(engine.curvature.completed))
    found: dict = {}
    outcome = pool.run(
        [Task("reliability", (shards, fit.reliability_sample), "reliability")],
        lambda task, result: found.update(result),
    )
    if outcome.failures:
        log.warning("reliability check failed: %s", outcome.failures[0][1])
    return found


def warn_if_short(examples: int, engine: InfluenceSSL) -> None:
    """A fit on fewer examples than the dimension spans only part of it: say so."""
    if examples < engine.dimension:
        print(
            f"note: the curvature was fitted on {examples:,} examples, fewer than its dimension "
            f"D = {engine.dimension:,}; it spans at most {examples:,} directions (damping is "
            "relative to that span). Fit on more examples (fit.max_shards) for a full-rank "
            "curvature.",
            flush=True,
        )


def fit_passes(engine: InfluenceSSL, pool: WorkerPool, sample: list[str]) -> dict:
    """Run every curvature pass of `engine` over `sample` on the pool."""
    read, failed, examples = ReadStats(), set(), 0
    for pass_name in engine.curvature.passes:
        if engine.curvature.completed:
            state = {k: v.cpu() for k, v in engine.curvature.state_dict().items()}
            pool.broadcast("load_curvature", state, list(engine.curvature.completed))
        progress = Progress(f"fit/{pass_name}", len(sample))
        merger = OrderedMerge(sample)

        def collect(task: Task, result: dict, merger=merger, progress=progress) -> None:
            merger.add(task.label, result)
            progress.update(result["examples"])

        tasks = [Task("accumulate", (pass_name, url), url) for url in sample]
        outcome = pool.run(tasks, collect)
        failed |= {task.label for task, _ in outcome.failures}
        merger.skip(failed)
        if not merger.shards:
            raise RuntimeError(f"fit pass {pass_name!r}: every shard failed: {outcome.failures}")
        engine.complete_pass(pass_name, merger.total)
        if pass_name == engine.curvature.passes[0]:
            examples, read = merger.examples, merger.read
    return {
        "shards": [u for u in sample if u not in failed],
        "failed_shards": sorted(failed),
        "examples": examples,
        "read": totals(read),
    }


class OrderedMerge:
    """Merges per-shard partial statistics in corpus order as they arrive.

    Summing in a fixed order makes the factors independent of the number of workers and of
    which finished first; only results that arrive ahead of a slower predecessor are held.
    """

    def __init__(self, order: list[str]) -> None:
        self.order = list(order)
        self.next = 0
        self.waiting: dict[str, dict | None] = {}
        self.total = Statistics()
        self.read = ReadStats()
        self.examples = 0
        self.shards: list[str] = []

    def add(self, shard: str, result: dict | None) -> None:
        self.waiting[shard] = result
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            current = self.order[self.next]
            ready = self.waiting.pop(current)
            if ready is not None:
                self.total.merge(Statistics.from_tensors(ready["stats"]))
                self.read = self.read + ReadStats.from_dict(ready["read"])
                self.examples += ready["examples"]
                self.shards.append(current)
            self.next += 1

    def skip(self, shards: set[str]) -> None:
        """Shards that failed: nothing will arrive for them."""
        for shard in shards:
            if shard not in self.waiting and shard in self.order[self.next :]:
                self.add(shard, None)


def totals(read: ReadStats) -> dict:
    """Merged read counts without the per-shard digests (those live in the shard list)."""
    return {k: v for k, v in read.to_dict().items() if k != "shards"}


def damping_values(engine: InfluenceSSL) -> dict[str, float]:
    state = engine.curvature.state_dict()
    return {k.rsplit("/", 1)[0]: float(v) for k, v in state.items() if k.endswith("/lambda")}


def clear_index(storage) -> None:
    """Remove everything an index wrote (factors, parts, markers, stats, manifest)."""
    for prefix in ("markers/", "parts/", "stats/", "factors/", "search/"):
        for path in storage.list(prefix):
            storage.delete(path)
    storage.delete(MANIFEST)
