"""How close are the index vectors of copies? cos(w) of exact and near copies vs unrelated pairs.

The demo's encoder (SmallCNN, 150 SimCLR steps on 2,000 real MNIST digits), 20 exact copies
and 20 near-copies (1-pixel shift, dimmed) under their own keys; w with views seeded by key
(the SPEC) and with one key for every example (views shared by all), at K = 2 and 8.

    python benchmarks/copies_probe.py        # ~15 min on 2 busy cores
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.demo import DemoConfig, load_digits, near_copy
from pipeline.influence.engine import InfluenceSSL
from pipeline.models import build_encoder
from pipeline.train import train_ssl


def unit(engine: InfluenceSSL, images: torch.Tensor, keys: list[str]) -> np.ndarray:
    w = engine.fit(images, keys).embed(images, keys).numpy()
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def main() -> None:
    config = DemoConfig()
    digits, _, _, _ = load_digits(2000, 0)
    torch.manual_seed(0)
    encoder = build_encoder(config.influence.model)
    train_ssl(
        encoder, digits, config.influence.augment, dataclasses.replace(config.train, steps=150)
    )
    rng = np.random.default_rng(0)
    originals = rng.choice(len(digits), 40, replace=False)
    near = torch.stack([near_copy(digits[i], rng) for i in originals[20:]])
    images = torch.cat([digits, digits[originals[:20]], near])
    n = len(digits)
    print("| views | K | exact copies (median) | near-copies (median) | unrelated, 99.9th pct |")
    print("|---|---:|---:|---:|---:|")
    for pairs in (2, 8):
        loss = dataclasses.replace(config.influence.loss, num_views=2 * pairs, view_seeding="key")
        influence = dataclasses.replace(config.influence, loss=loss)
        for views, keys in (
            ("seeded by key", [f"k{i}" for i in range(len(images))]),
            ("shared by all", ["shared"] * len(images)),
        ):
            u = unit(InfluenceSSL(encoder, influence), images, keys)
            copies = (u[originals] * u[n:]).sum(1)
            unrelated = u[:n] @ u[:n].T
            pct = np.quantile(unrelated[np.triu_indices(n, 1)], 0.999)
            print(
                f"| {views} | {pairs} | {np.median(copies[:20]):.2f} | "
                f"{np.median(copies[20:]):.2f} | {pct:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
