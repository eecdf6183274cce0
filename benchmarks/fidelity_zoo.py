"""Fidelity and cost of projected influence on a ViT, a depthwise net and ResNet-18.

Each encoder is trained briefly with SimCLR (`pipeline.train`) on 32 px random crops of the
photographs bundled with scikit-image and scikit-learn (as `view_reliability.py`'s
`resnet18_32` setting makes them), then runs the engine at its defaults (V = 16 common
views, all pairs, 16 x 16 projections, grouped convolutions at 8 x 8, curvature `auto`,
damping 1.0 x trace(F) / min(N, D)) on N train crops (seen in training) and Q held-out ones:

* ViT: `vit_tiny_patch16` at patch 8, width 64, depth 2, 2 heads (CLS token);
* depthwise: a MobileNet-like net of the built-in blocks: MobileNetV2 inverted residuals
  (depthwise 3x3) and EfficientNet MBConvs (depthwise 5x5, squeeze-excitation);
* ResNet-18: torchvision layout, ImageNet stem.

Ground truth: exact per-example gradients (`pipeline.influence.exact`, torch.func) of every
tracked layer, unprojected, under the exact damped Fisher inverse with the same damping rule
(lambda = trace(F) / min(N, P)). With P parameters far above N, the scores come from the Gram
matrices (kernel form of the damped inverse, checked against `damped_inverse_scores` at the
start): S = K_qt (K_tt / N + lambda I)^-1, K = G G^T; ResNet-18's gradients (11M per example)
go through a float32 memory map on disk.

Figures: Spearman and Pearson of all Q x N scores, mean top-10 proponent overlap (chance
10 / N), Spearman of self-influence; cost: time of `embed` (hooked backward, projections,
whitening) over the time of a plain forward + backward with weight gradients on the same
batch of views (round-robin medians; views excluded).

    OMP_NUM_THREADS=1 python benchmarks/fidelity_zoo.py   # about 10 min on one CPU thread

Writes `benchmarks/results/fidelity_zoo.md`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cost import round_robin
from scipy.stats import pearsonr
from torch import nn
from view_reliability import photo_crops

from pipeline.config import AugmentConfig, InfluenceConfig, ModelConfig
from pipeline.influence.engine import InfluenceSSL, default_keys
from pipeline.influence.exact import damped_inverse_scores, exact_gradients
from pipeline.influence.loss import consistency_loss
from pipeline.influence.scoring import influence, self_influence
from pipeline.models import Encoder, build_encoder
from pipeline.models.common import conv_norm_act
from pipeline.models.efficientnet import MBConv
from pipeline.models.mobilenet import InvertedResidualV2
from pipeline.testing import spearman, top_overlap
from pipeline.train import TrainConfig, train_ssl

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 32
IN_MEMORY_BYTES = 1 << 30  # exact gradients above this go to a memory map on disk


class MobileNetLike(nn.Module):
    """Stem, two inverted residuals (depthwise 3x3), two MBConvs (depthwise 5x5 + SE), 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_norm_act(3, 16, 3, 2, act=nn.ReLU6),
            InvertedResidualV2(16, 24, 2, 4),
            InvertedResidualV2(24, 24, 1, 4),
            MBConv(4, 5, 2, 24, 40),
            MBConv(4, 5, 1, 40, 40),
            conv_norm_act(40, 160, 1, act=nn.ReLU6),
        )
        self.out_dim = 160

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


VIT = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": SIZE}


@dataclass
class Setting:
    name: str
    describe: str
    build: Callable[[], Encoder]
    num_train: int
    num_query: int
    batch: int  # SimCLR examples per step
    cost_reps: int
    model: ModelConfig = field(default_factory=ModelConfig)


def settings(args: argparse.Namespace) -> dict[str, Setting]:
    vit = ModelConfig(arch="vit_tiny_patch16", kwargs=VIT)
    resnet = ModelConfig(arch="resnet18")
    return {
        "vit": Setting(
            "vit",
            "ViT (vit_tiny_patch16: patch 8, width 64, depth 2, 2 heads, CLS)",
            lambda: build_encoder(vit),
            args.num_train,
            args.num_query,
            64,
            15,
            vit,
        ),
        "depthwise": Setting(
            "depthwise",
            "MobileNet-like (2 inverted residuals, 2 MBConv + SE; 4 depthwise convs)",
            lambda: Encoder(MobileNetLike()).eval(),
            args.num_train,
            args.num_query,
            64,
            15,
        ),
        "resnet18": Setting(
            "resnet18",
            "ResNet-18 (torchvision, ImageNet stem)",
            lambda: build_encoder(resnet),
            args.resnet_train,
            args.resnet_query,
            32,
            5,
            resnet,
        ),
    }


# -- exact influence from Gram matrices --------------------------------------------------------


def kernel_scores(k_qt: torch.Tensor, k_tt: torch.Tensor, damping: float = 1.0):
    """g_q^T (F + lambda I)^-1 g_t [Q, N] and the train self-influence [N] from Gram matrices.

    F = G^T G / N, lambda = damping x trace(F) / min(N, P) with P >= N (the engine's
    "spanned" rule); (F + lambda I)^-1 G^T = N G^T (K_tt + N lambda I)^-1 (push-through).
    """
    n = k_tt.shape[0]
    lam = damping * torch.trace(k_tt) / n / n
    damped = k_tt + n * lam * torch.eye(n, dtype=k_tt.dtype)
    solved = n * torch.linalg.solve(damped, torch.cat([k_qt.T, k_tt], dim=1))  # symmetric
    return solved[:, : len(k_qt)].T, torch.diagonal(solved[:, len(k_qt) :])


def check_kernel_scores() -> None:
    """The kernel form equals the P x P damped inverse (P > N) on random gradients."""
    g = torch.randn(40, 300, dtype=torch.float64) * torch.linspace(0.1, 2, 300)
    q = torch.randn(7, 300, dtype=torch.float64)
    scores, self_scores = kernel_scores(q @ g.T, g @ g.T)
    torch.testing.assert_close(scores, damped_inverse_scores(g, q))
    torch.testing.assert_close(self_scores, torch.diagonal(damped_inverse_scores(g, g)))


class GradientStore:
    """Exact per-example gradients [n, P] float32, in memory or memory-mapped on disk."""

    def __init__(self, n: int, p: int, folder: str) -> None:
        if n * p * 4 > IN_MEMORY_BYTES:
            self.array = np.lib.format.open_memmap(f"{folder}/grads.npy", "w+", np.float32, (n, p))
        else:
            self.array = np.empty((n, p), np.float32)

    def gram(self, block: int = 1 << 18) -> torch.Tensor:
        """G G^T in float64, over column blocks."""
        n, p = self.array.shape
        out = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, p, block):
            g = torch.from_numpy(np.ascontiguousarray(self.array[:, start : start + block]))
            g = g.double()
            out += g @ g.T
        return out


def exact_gram(engine: InfluenceSSL, images: torch.Tensor, keys: list[str], chunk: int):
    """Gram matrix of the exact unprojected per-example gradients of every tracked layer."""
    names = engine.tracker.names
    p = sum(layer.features_in * layer.features_out for layer in engine.tracker.layers)
    with tempfile.TemporaryDirectory(prefix="fidelity_zoo_") as folder:
        store = GradientStore(len(images), p, folder)
        for start in range(0, len(images), chunk):
            views = engine.make_views(images[start : start + chunk], keys[start : start + chunk])
            grads = exact_gradients(engine.encoder, views, names)
            flat = torch.cat([grads[n].flatten(1) for n in names], dim=1)
            store.array[start : start + len(flat)] = flat.float().numpy()
        gram = store.gram()
        del store
    return gram, p


# -- one setting -------------------------------------------------------------------------------


def cost_ratio(engine: InfluenceSSL, images: torch.Tensor, reps: int) -> dict[str, float]:
    """Seconds per batch of a plain forward + backward (weight gradients) and of `embed`."""
    batch = min(engine.examples_per_batch(), len(images))
    keys = default_keys(batch)
    views = engine.make_views(images[:batch], keys)
    b, v = views.shape[:2]
    encoder, loss = engine.encoder, engine.config.loss

    def baseline() -> None:
        z = encoder(views.flatten(0, 1)).reshape(b, v, -1)
        consistency_loss(z, loss.kind, loss.estimator).sum().backward()
        encoder.zero_grad(set_to_none=True)

    def embed() -> None:
        engine.curvature.whiten(engine.project_views(views)[0].gradients())

    encoder.requires_grad_(True)
    seconds = round_robin({"baseline": baseline, "embed": embed}, reps, engine.device)
    return {**seconds, "batch": b}


def run(setting: Setting, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    crops = photo_crops(SIZE, args.train_images + setting.num_query, seed=0)
    pool, query = crops[: args.train_images], crops[args.train_images :]
    train = pool[: setting.num_train]
    augment = AugmentConfig(size=SIZE)
    encoder = setting.build()
    tic = time.perf_counter()
    training = TrainConfig(steps=args.steps, batch_size=setting.batch)
    losses = train_ssl(encoder, pool, augment, training)
    trained = time.perf_counter() - tic
    config = InfluenceConfig(model=setting.model, augment=augment, device="cpu")
    engine = InfluenceSSL(encoder.eval(), config)
    train_keys = default_keys(len(train))
    query_keys = [f"q{i:04d}" for i in range(len(query))]

    tic = time.perf_counter()
    engine.fit(train, train_keys)
    w_train, w_query = engine.embed(train, train_keys), engine.embed(query, query_keys)
    projected_s = time.perf_counter() - tic
    scores = influence(w_query, w_train).double()
    self_scores = self_influence(w_train).double()

    tic = time.perf_counter()
    images, keys = torch.cat([train, query]), train_keys + query_keys
    gram, p = exact_gram(engine, images, keys, args.chunk)
    n = len(train)
    exact, exact_self = kernel_scores(gram[n:, :n], gram[:n, :n])
    exact_s = time.perf_counter() - tic
    cost = cost_ratio(engine, train, setting.cost_reps)
    coverage = engine.tracker.coverage()["layer_parameters"]
    grouped = sum(
        getattr(engine.encoder.get_submodule(name), "groups", 1) > 1
        for name in engine.tracker.names
    )
    return {
        "setting": setting,
        "params": sum(q.numel() for q in encoder.parameters()),
        "tracked": p,
        "untracked": coverage["untracked"],
        "layers": len(engine.tracker.names),
        "grouped": grouped,
        "D": engine.dimension,
        "curvature": engine.curvature.kind,
        "loss": (losses[0], losses[-1]),
        "N": n,
        "Q": len(query),
        "spearman": spearman(scores, exact),
        "pearson": float(pearsonr(scores.flatten().numpy(), exact.flatten().numpy()).statistic),
        "top10": top_overlap(scores, exact, 10),
        "self": spearman(self_scores, exact_self),
        "seconds": {"train": trained, "fit+embed": projected_s, "exact": exact_s},
        "cost": cost,
    }


# -- report ------------------------------------------------------------------------------------


def report(results: list[dict], args: argparse.Namespace, command: str, total: float) -> str:
    lines = [
        "# Fidelity and cost on ViT and depthwise encoders",
        "",
        f"`{command}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
        f"{platform.machine()}; {total:.0f} s in all (other work was running on the machine). "
        f"Each encoder: SimCLR, {args.steps} steps (batch in the second table, two views "
        f"each) on {args.train_images} random {SIZE} px crops of the bundled photographs; N train "
        "crops (from those), Q held-out crops. Engine at its defaults: V = 16 common views, all "
        "pairs, 16 x 16 projections (grouped / depthwise Conv2d 8 x 8), curvature auto, "
        "damping 1.0 x trace / min(N, D). Exact: unprojected per-example gradients of every "
        "tracked layer (torch.func), exact damped Fisher inverse with lambda = trace(F) / "
        "min(N, P).",
        "",
        "| encoder | params | tracked P | layers (grouped) | D | curvature | N | Q | "
        "ρ all | Pearson | top-10 | ρ self | embed ÷ fwd+bwd (time) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r["cost"]
        lines.append(
            f"| {r['setting'].describe} | {r['params']:,} | {r['tracked']:,} | {r['layers']} "
            f"({r['grouped']}) | {r['D']:,} | {r['curvature']} | {r['N']} | {r['Q']} | "
            f"{r['spearman']:.3f} | {r['pearson']:.3f} | {r['top10']:.2f} | {r['self']:.3f} | "
            f"{c['embed'] / c['baseline']:.2f} |"
        )
    lines += [
        "",
        "top-10: mean share of each query's 10 exact top proponents that the projected "
        "scores also rank in their top 10 (chance 10 / N). Cost: seconds per batch of "
        "examples (V = 16 views each), round-robin medians, views excluded:",
        "",
        "| encoder | batch | fwd+bwd s | embed s | embed ex/s | SimCLR batch | SimCLR loss "
        "(first -> last) | train s | fit+embed s | exact s | untracked params |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        c, s = r["cost"], r["seconds"]
        lines.append(
            f"| {r['setting'].name} | {c['batch']} | {c['baseline']:.3f} | {c['embed']:.3f} | "
            f"{c['batch'] / c['embed']:.1f} | {r['setting'].batch} | "
            f"{r['loss'][0]:.2f} -> {r['loss'][1]:.2f} | "
            f"{s['train']:.0f} | {s['fit+embed']:.0f} | {s['exact']:.0f} | {r['untracked']:,} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["vit", "depthwise", "resnet18"])
    parser.add_argument("--num-train", type=int, default=300)
    parser.add_argument("--num-query", type=int, default=30)
    parser.add_argument("--resnet-train", type=int, default=120)
    parser.add_argument("--resnet-query", type=int, default=15)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "fidelity_zoo.md"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    check_kernel_scores()
    table = settings(args)
    results = []
    for name in args.settings:
        results.append(run(table[name], args))
        r = results[-1]
        print(
            f"{name}: D={r['D']} rho {r['spearman']:.3f} pearson {r['pearson']:.3f} "
            f"top10 {r['top10']:.2f} self {r['self']:.3f} "
            f"cost {r['cost']['embed'] / r['cost']['baseline']:.2f} {r['seconds']}",
            flush=True,
        )
    given = " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k != "out"
    )
    command = f"OMP_NUM_THREADS=1 python benchmarks/fidelity_zoo.py {given}"
    text = report(results, args, command, time.perf_counter() - started)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
