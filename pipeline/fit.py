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

import ray

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
from pipeline.influence.tracker import coverage_warning
from pipeline.models import model_identity
from pipeline.runtime.pool import Task, WorkerPool, connect
from pipeline.runtime.progress import Progress
from pipeline.runtime.reduce import Node, TreeReduce, block_level
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

    coverage = driver.engine.tracker.coverage()
    warn_if_untracked(coverage)  # before the passes: a fit is long, a wrong layer set is not
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
    manifest.update(coverage)  # tracked_layers, skipped_layers, layer_parameters
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


def warn_if_untracked(coverage: dict) -> None:
    """Log when a large share of the encoder's weights is outside w (see the manifest)."""
    message = coverage_warning(coverage)
    if message:
        log.warning(message)


def fit_passes(engine: InfluenceSSL, pool: WorkerPool, sample: list[str]) -> dict:
    """Run every curvature pass of `engine` over `sample` on the pool."""
    read, failed, examples, nodes = ReadStats(), set(), 0, {}
    for pass_name in engine.curvature.passes:
        if engine.curvature.completed:
            state = {k: v.cpu() for k, v in engine.curvature.state_dict().items()}
            pool.broadcast("load_curvature", state, list(engine.curvature.completed))
        reduced = TreePass(
            pass_name, sample, len(pool.actors), pool.runtime.max_retries, pool.config.progress
        )
        with reduced.progress:  # closed short of the total when shards failed
            outcome = pool.run(reduced.tasks(), reduced.collect, reduced.split, reduced.leave_out)
        failed |= {u for task, _ in outcome.failures for u in reduced.shards_of(task)}
        total = reduced.total()
        if total is None:
            raise RuntimeError(
                f"fit pass {pass_name!r}: no shard could be summed: {outcome.failures}"
            )
        engine.complete_pass(pass_name, total)
        if pass_name == engine.curvature.passes[0]:
            examples, read, nodes = reduced.examples, reduced.read, reduced.nodes
    return {
        "shards": [u for u in sample if u not in failed],
        "failed_shards": sorted(failed),
        "examples": examples,
        "read": totals(read),
        "nodes": nodes,
    }


class TreePass:
    """One curvature pass as a fixed-tree reduce (pipeline.runtime.reduce) on the pool.

    Workers sum aligned blocks of shards and return one partial each; siblings are merged
    by a worker as soon as both exist, and each partial is released once merged, so the
    driver holds object references, never partials, until it fetches the root. A block that
    fails is split into its halves (the tree, and so the sums, stay the same); a shard
    that keeps failing is left out as an empty leaf.
    """

    def __init__(
        self, pass_name: str, sample: list[str], workers: int, retries: int, progress: bool = True
    ) -> None:
        self.pass_name, self.sample, self.retries = pass_name, sample, retries
        self.leaves = len(sample)
        self.level = block_level(self.leaves, workers)
        self.tree = TreeReduce(self.leaves)
        self.progress = Progress(f"fit/{pass_name}", self.leaves, enabled=progress)
        self.read, self.examples = ReadStats(), 0
        self.nodes: dict[str, int] = {}  # cluster node -> shards it summed

    def tasks(self) -> list[Task]:
        root = Node(self.tree.top, 0)
        return [self.block_task(b) for b in root.blocks(self.level, self.leaves)]

    def block_task(self, block: Node, attempts: int = 0) -> Task:
        urls = self.sample[block.first : block.end(self.leaves)]
        label = urls[0] if len(urls) == 1 else f"shards {block.first}..{block.end(self.leaves) - 1}"
        args = (self.pass_name, urls, (block.level, block.index), self.leaves)
        return Task("accumulate_block", args, label, attempts, returns=2, context=block)

    def collect(self, task: Task, result: tuple[dict, ray.ObjectRef]) -> list[Task]:
        counts, partial = result
        if task.method == "accumulate_block":
            self.read += ReadStats.from_dict(counts["read"])
            self.examples += counts["examples"]
            self.progress.update(counts["examples"], done=counts["shards"])
            node = counts.get("node") or "local"
            self.nodes[node] = self.nodes.get(node, 0) + counts["shards"]
        return self.offer(task.context, partial)

    def offer(self, node: Node, partial) -> list[Task]:
        pending = self.tree.add(node, partial)
        if pending is None:
            return []
        # The merge task holds its inputs until it runs; the tree has dropped its own refs.
        args = (pending.left, pending.right)
        return [Task("merge", args, f"merge {pending.node}", returns=2, context=pending.node)]

    def split(self, task: Task, error: Exception) -> list[Task] | None:
        node: Node = task.context
        if task.method == "merge":
            # An input may be lost with its node: recompute the subtree's blocks.
            if task.attempts >= self.retries:
                return None
            self.tree.forget(node)
            blocks = node.blocks(self.level, self.leaves)
            return [self.block_task(b, task.attempts + 1) for b in blocks]
        if node.level == 0:
            return None  # one shard: the pool's retries, then `leave_out`
        left, right = node.children()
        return [self.block_task(n, task.attempts) for n in (left, right) if n.first < self.leaves]

    def leave_out(self, task: Task, error: str) -> list[Task]:
        """A shard that failed its last attempt is an empty leaf: its siblings go on up the
        tree (a merge that failed for good has no such stand-in: the pass then fails)."""
        if task.method != "accumulate_block":
            return []
        return self.offer(task.context, None)

    def shards_of(self, task: Task) -> list[str]:
        """The shards a given-up task left out (none for a merge)."""
        if task.method != "accumulate_block":
            return []
        return self.sample[task.context.first : task.context.end(self.leaves)]

    def total(self) -> Statistics | None:
        """The root's statistics; None when nothing was summed."""
        if not self.tree.done or self.tree.root is None:
            return None
        return Statistics.from_tensors(ray.get(self.tree.root))


def totals(read: ReadStats) -> dict:
    """Merged read counts without the per-shard digests (those live in the shard list)."""
    return {k: v for k, v in read.to_dict().items() if k != "shards"}


def damping_values(engine: InfluenceSSL) -> dict[str, float]:
    state = engine.curvature.state_dict()
    return {k.rsplit("/", 1)[0]: float(v) for k, v in state.items() if k.endswith("/lambda")}


def clear_index(storage) -> None:
    """Remove everything an index wrote (factors, parts, markers, stats, manifest)."""
    for prefix in ("markers/", "parts/", "stats/", "factors/", "search/"):
        storage.delete_many(storage.list(prefix))
    storage.delete(MANIFEST)
