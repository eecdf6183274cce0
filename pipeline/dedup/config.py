"""Settings of `dedup` and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import RuntimeConfig, SettingError

MODES = ("influence", "embedding")
KEEP_POLICIES = ("first", "lowest_self_influence", "highest_self_influence")
# Cosine thresholds per mode, from benchmarks/results/demo_quality.md (pixel hash off, 4,050
# digits with 20 planted near-copies): influence with refined w at 0.9 finds as many
# near-copies as the embedding at 0.99 with fewer false removals (252 vs 322); 0.8 finds
# 19 of 20 (887 false removals, against 2,524 for the embedding at 0.95 finding 18).
DEFAULT_TAU = {"influence": 0.9, "embedding": 0.99}
# Views of the refined w of candidate pairs (influence mode): demo_quality.md shows refined
# pairs separating near-copies from unrelated digits where stored w (V = 16) does not.
DEFAULT_REFINE = 64
VECTOR_COLUMN = {"influence": "w", "embedding": "z"}
REASONS = ("unique", "kept", "exact_duplicate", "influence_duplicate", "embedding_duplicate")


@dataclass
class DedupConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    mode: str = "influence"  # "influence" (cosine of w) or "embedding" (cosine of z)
    tau: float | None = None  # cosine threshold; None: DEFAULT_TAU[mode]
    k: int = 16  # neighbours searched per example (edges of the kNN graph)
    # "first": the earliest in corpus order (manifest shard order, then position in the
    # shard: originals before their later copies); "lowest_self_influence", "highest_..."
    keep: str = "first"
    exact: bool = True  # also join rows with the same decoded-pixel hash
    top: int = 10  # largest groups to print
    # The search: near-duplicates are each other's nearest neighbours, so few IVF lists and
    # few candidates re-ranked suffice (the stored search index's own nprobe is for queries).
    # 4 lists found every edge 8 did on a 50,000-row batch at 10^6 (2 found all, 1 lost 0.4%),
    # in 0.74x the time (benchmarks/results/scale.md).
    nprobe: int = 4  # IVF lists probed per query (IVF-PQ search indexes)
    candidates: int = 0  # approximate hits re-ranked exactly per query; 0: k + 1
    chunk: int = 50_000  # rows per edge batch (whole consecutive parts): one task's queries
    # Exact (flat) search up to this many rows, IVF-PQ above: a flat search costs N^2 D (an
    # index's flat `search/`, up to search.flat_max_rows, gets an IVF-PQ one beside it).
    flat_max_rows: int = 20_000
    # Influence mode: candidate pairs with stored cos(w) >= refine_floor are re-scored with w
    # of `refine` views (images read back from their shards), and joined when that refined
    # cosine is >= tau. None: DEFAULT_REFINE views in influence mode; 0: off. At most
    # `refine_max` examples are re-embedded (the candidates of the most similar pairs first).
    refine: int | None = None
    refine_floor: float = 0.5
    refine_max: int = 20_000
    # Where edge batches and list parts run: Ray tasks (`ray=true` or a runtime.address:
    # that cluster, else $RAY_ADDRESS, else an embedded local Ray) or threads in this process.
    # runtime.num_workers: batches at once (0: all CPUs / cpus_per_worker);
    # runtime.cpus_per_worker: CPUs (FAISS threads) per batch.
    ray: bool = False
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    progress: bool = True  # progress on stderr: a tqdm bar on terminals, else a line every 2 s

    def uses_ray(self) -> bool:
        return self.ray or bool(self.runtime.address)

    def resolved_tau(self) -> float:
        return DEFAULT_TAU[self.mode] if self.tau is None else float(self.tau)

    def resolved_refine(self) -> int:
        if self.refine is None:
            return DEFAULT_REFINE if self.mode == "influence" else 0
        return int(self.refine)

    def resolved_candidates(self) -> int:
        return max(self.candidates, self.k + 1)

    def edge_floor(self) -> float:
        """The cosine an edge needs to be kept: tau, or the refinement's lower floor."""
        tau = self.resolved_tau()
        return min(self.refine_floor, tau) if self.resolved_refine() else tau


def check_config(config: DedupConfig) -> None:
    if config.mode not in MODES:
        raise SettingError(f"unknown dedup mode {config.mode!r}; choose one of {MODES}")
    if config.keep not in KEEP_POLICIES:
        raise SettingError(f"unknown keep policy {config.keep!r}; choose one of {KEEP_POLICIES}")
    tau = config.resolved_tau()
    if not -1.0 <= tau <= 1.0:
        raise SettingError(f"tau is a cosine threshold and must lie in [-1, 1], got {tau}")
    if config.k < 1 or config.chunk < 1:
        raise SettingError(f"k and chunk must be >= 1, got k={config.k}, chunk={config.chunk}")
    if config.nprobe < 1 or config.candidates < 0:
        raise SettingError(
            f"nprobe must be >= 1 and candidates >= 0, got {config.nprobe}, {config.candidates}"
        )
    if config.resolved_refine() and config.mode != "influence":
        raise SettingError("refine re-embeds w: it applies to mode=influence only")
