"""Reliability of w against the number of views, the estimator, view seeding and damping.

For each setting an encoder is trained briefly (SimCLR), the curvature is fitted on a fit set
with the row's settings, and a fixed sample is embedded twice, with views 0..V-1 and with the
independent views V..2V-1; `pipeline.influence.reliability.measure` compares the two. The
"centred" columns subtract each set's mean w over the sample first (a control variate for the
part of the view noise that common views share across examples). Cost is seconds per 1,000
examples of the embedding pass, measured in this run.

    OMP_NUM_THREADS=2 python benchmarks/view_reliability.py --settings demo resnet18_32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AugmentConfig, InfluenceConfig, ModelConfig
from pipeline.demo import DemoConfig, load_digits
from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.reliability import measure
from pipeline.models import build_encoder
from pipeline.train import TrainConfig, train_ssl

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass
class Row:
    name: str
    views: int
    estimator: str = "all_pairs"
    seeding: str = "common"
    damping_mode: str = "spanned"
    damping: float = 1.0
    embed_views: int = 0  # views of the two embeddings compared; 0: `views` (refine: more)
    augment: dict = dataclasses.field(default_factory=dict)  # overrides of the view family


ROWS = [
    Row("before: K = 2 pairs, keyed views, damping 0.1 x mean", 4, "pairs", "key", "relative", 0.1),
    Row("all pairs, common views, damping 0.1", 4, damping=0.1),
    Row("all pairs, common views, damping 0.1", 8, damping=0.1),
    Row("all pairs, common views, damping 0.1", 16, damping=0.1),
    Row("all pairs, common views, damping 0.1", 32, damping=0.1),
    Row(
        "all pairs, common views, damping 0.1 x mean over all D",
        16,
        damping_mode="relative",
        damping=0.1,
    ),
    Row("all pairs, keyed views, damping 0.1", 16, seeding="key", damping=0.1),
    Row("all pairs, common views, damping 0.3", 16, damping=0.3),
    Row("default: all pairs, common views, damping 1.0", 16),
    Row("all pairs, common views, damping 1.0, no colour jitter", 16, augment={"jitter_p": 0.0}),
    Row("all pairs, common views, damping 1.0", 8),
    Row("all pairs, common views, damping 1.0", 32),
    Row("refined: factors at V = 16, w with 64 views", 16, embed_views=64),
    Row("refined: factors at V = 16, w with 128 views", 16, embed_views=128),
    Row("stratified views (Latin hypercube blocks), damping 1.0", 16, seeding="stratified"),
    Row("stratified views, damping 1.0", 32, seeding="stratified"),
    Row("stratified, refined: w with 64 views", 16, seeding="stratified", embed_views=64),
    Row("stratified, refined: w with 128 views", 16, seeding="stratified", embed_views=128),
]


def photo_crops(side: int, count: int, seed: int) -> torch.Tensor:
    """Random crops (random scale and position) of the colour photographs that ship with
    scikit-image and scikit-learn, resized to `side` (antialiased)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.cat()]
    photos += list(load_sample_images().images)
    tensors = [
        torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1).float() / 255 for p in photos
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        x = tensors[i % len(tensors)]
        h, w = x.shape[1:]
        size = int(rng.integers(min(h, w) // 8, min(h, w) // 2))
        top, left = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        crop = x[None, :, top : top + size, left : left + size]
        out.append(F.interpolate(crop, size=side, mode="bilinear", antialias=True)[0])
    return torch.stack(out).clamp(0, 1)


def setting(name: str, args) -> tuple[InfluenceConfig, torch.Tensor, torch.Tensor]:
    """(base config, fit images, sample images) with a freshly trained encoder's config."""
    if name == "demo":
        base = DemoConfig().influence
        images = load_digits(args.fit + args.sample, 0)[0]
    elif name == "resnet18_32":
        base = InfluenceConfig(
            model=ModelConfig(arch="resnet18", in_channels=3),
            augment=AugmentConfig(size=32),
        )
        images = photo_crops(32, args.fit + args.sample, seed=0)
    else:
        raise ValueError(name)
    return dataclasses.replace(base, device="cpu"), images[: args.fit], images[args.fit :]


def sample_arguments(parser: argparse.ArgumentParser, sample: int) -> None:
    """--fit, --sample and --steps: what `setting` and `trained` read."""
    parser.add_argument("--fit", type=int, default=2000, help="fit images")
    parser.add_argument("--sample", type=int, default=sample, help="images embedded")
    parser.add_argument("--steps", type=int, default=200, help="SimCLR steps of the encoder")


def trained(config: InfluenceConfig, images: torch.Tensor, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = build_encoder(config.model)
    train_ssl(encoder, images, config.augment, TrainConfig(steps=steps, batch_size=128))
    return encoder.eval()


def evaluate(encoder, base: InfluenceConfig, row: Row, fit, sample) -> dict:
    loss = dataclasses.replace(
        base.loss, num_views=row.views, estimator=row.estimator, view_seeding=row.seeding
    )
    curvature = dataclasses.replace(
        base.curvature, damping_mode=row.damping_mode, damping=row.damping
    )
    augment = dataclasses.replace(base.augment, **row.augment)
    config = dataclasses.replace(base, loss=loss, curvature=curvature, augment=augment)
    engine = InfluenceSSL(encoder, config)
    engine.fit(fit)
    keys = [f"s{i}" for i in range(len(sample))]
    views = row.embed_views or row.views
    tic = time.perf_counter()
    w_a = engine.use_views(views, 0).embed(sample, keys)
    seconds = time.perf_counter() - tic
    w_b = engine.use_views(views, views).embed(sample, keys)
    raw = measure(w_a, w_b, views)
    centred = measure(w_a - w_a.mean(0), w_b - w_b.mean(0), views)
    return {
        **dataclasses.asdict(row),
        "D": engine.dimension,
        "fit": len(fit),
        "raw": raw,
        "centred": centred,
        "seconds_per_1000": 1000 * seconds / len(sample),  # indicative: not round-robin
    }


def cost_table(encoder, base: InfluenceConfig, sample, views: list[int], reps: int) -> str:
    """Seconds per 1,000 examples of the embedding pass at each V, timed round-robin (one
    warm-up each, then `reps` rounds, median), so load on the machine hits all alike."""
    engines = {}
    for v in views:
        loss = dataclasses.replace(base.loss, num_views=v)
        engine = InfluenceSSL(encoder, dataclasses.replace(base, loss=loss))
        engines[v] = engine.fit(sample[:64])
    keys = [f"s{i}" for i in range(len(sample))]
    times = {v: [] for v in views}
    for rep in range(reps + 1):
        for v, engine in engines.items():
            tic = time.perf_counter()
            engine.embed(sample, keys)
            if rep:
                times[v].append(time.perf_counter() - tic)
    median = {v: float(np.median(t)) * 1000 / len(sample) for v, t in times.items()}
    lines = ["| V | s per 1,000 examples | vs V = 4 |", "|---:|---:|---:|"]
    lines += [f"| {v} | {median[v]:.2f} | {median[v] / median[views[0]]:.2f}x |" for v in views]
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = [
        "| views | V | cos(w) median | self-infl. Spearman | top-10 shared | centred: cos | "
        "centred: top-10 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        raw, cen = r["raw"], r["centred"]
        lines.append(
            f"| {r['name']} | {r['embed_views'] or r['views']} | {raw['median_cos']:.2f} | "
            f"{raw['self_influence_spearman']:.3f} | {raw['top10_overlap']:.2f} | "
            f"{cen['median_cos']:.2f} | {cen['top10_overlap']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", nargs="+", default=["demo", "resnet18_32"])
    sample_arguments(parser, sample=300)
    parser.add_argument("--cost-sample", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="*", help="indices into ROWS (default all)")
    parser.add_argument("--out", default=str(RESULTS / "view_reliability.md"))
    args = parser.parse_args()
    rows = [ROWS[i] for i in args.rows] if args.rows else ROWS
    sections = []
    raw_json = {}
    for name in args.settings:
        base, fit, sample = setting(name, args)
        tic = time.perf_counter()
        encoder = trained(base, fit, args.steps)
        print(f"{name}: trained in {time.perf_counter() - tic:.0f} s", flush=True)
        results = []
        for row in rows:
            results.append(evaluate(encoder, base, row, fit, sample))
            r = results[-1]
            row_views = row.embed_views or row.views
            print(
                f"{name} | {row.name} V={row_views}: cos {r['raw']['median_cos']:.3f} "
                f"spearman {r['raw']['self_influence_spearman']:.3f} "
                f"top10 {r['raw']['top10_overlap']:.3f} centred cos "
                f"{r['centred']['median_cos']:.3f} top10 {r['centred']['top10_overlap']:.3f} "
                f"{r['seconds_per_1000']:.1f} s/1000",
                flush=True,
            )
        raw_json[name] = results
        d = results[0]["D"]
        costs = cost_table(encoder, base, sample[: args.cost_sample], [4, 8, 16, 32, 64], 3)
        sections.append(
            f"## {name}: {base.model.arch} {base.model.kwargs}, D = {d}, curvature fitted on "
            f"{len(fit)} examples, {len(sample)} examples embedded twice, {args.steps} SimCLR "
            f"steps\n\n{table(results)}\n\nCost of the embedding pass (round-robin, "
            f"{args.cost_sample} examples, median of 3):\n\n{costs}\n"
        )
    command = "OMP_NUM_THREADS=2 python benchmarks/view_reliability.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k not in ("out", "rows") and v is not None
    )
    text = f"# Reliability of w against the views\n\n`{command}`\n\n" + "\n".join(sections)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(raw_json, indent=2))
    print(text)


if __name__ == "__main__":
    main()
