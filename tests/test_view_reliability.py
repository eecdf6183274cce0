"""Reliability figures of w: two independent view sets compared (pipeline/influence/reliability)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from pipeline.influence.reliability import (
    describe,
    measure,
    spearman,
    spearman_brown,
    top_overlap,
    views_for,
)


def noisy_pair(n: int, d: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two measurements of the same signals with independent noise of the given scale."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, d, generator=g, dtype=torch.float64)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 + 0.5  # varied ||w||
    a = scale * (signal + noise * torch.randn(n, d, generator=g, dtype=torch.float64))
    b = scale * (signal + noise * torch.randn(n, d, generator=g, dtype=torch.float64))
    return a, b


def test_identical_sets_are_perfectly_reliable() -> None:
    a, _ = noisy_pair(50, 20, 0.0)
    figures = measure(a, a.clone(), views=8)
    assert figures["median_cos"] == pytest.approx(1.0)
    assert figures["self_influence_spearman"] == pytest.approx(1.0)
    assert figures["top10_overlap"] == 1.0
    assert figures["below_targets"] == [] and describe(figures)[-1].startswith("  projected")


def test_cos_tracks_the_signal_share_and_spearman_brown_predicts_more_views() -> None:
    # Noise variance sigma^2 per coordinate at V views; averaging 4x the views divides it by 4.
    a, b = noisy_pair(400, 200, noise=1.0)
    at_v = measure(a, b, views=4)
    assert at_v["median_cos"] == pytest.approx(0.5, abs=0.05)  # signal / (signal + noise)
    a4, b4 = noisy_pair(400, 200, noise=0.5, seed=1)
    measured = measure(a4, b4, views=16)["median_cos"]
    assert at_v["projected"]["16"]["median_cos"] == pytest.approx(measured, abs=0.03)
    assert "WARNING" in "\n".join(describe(at_v))


def test_spearman_brown_and_its_inverse() -> None:
    assert spearman_brown(0.5, 1) == pytest.approx(0.5)
    assert spearman_brown(0.5, 3) == pytest.approx(0.75)
    assert spearman_brown(0.2, 0.5) == pytest.approx(0.1 / 0.9)
    needed = views_for(0.25, 8, 0.6)
    assert spearman_brown(0.25, needed / 8) >= 0.6 > spearman_brown(0.25, (needed - 1) / 8)
    assert views_for(0.7, 8, 0.6) == 8 and views_for(0.0, 8, 0.6) is None


def test_spearman_and_top_overlap_against_references() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=300), rng.normal(size=300)
    y = x + 0.5 * y
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    a, b = noisy_pair(60, 10, 0.3)
    ua, ub = [(w / w.norm(dim=1, keepdim=True)).numpy() for w in (a, b)]
    expected = []
    for i in range(60):
        ca, cb = ua @ ua[i], ub @ ub[i]
        ca[i] = cb[i] = -np.inf
        expected.append(len(set(np.argsort(-ca)[:10]) & set(np.argsort(-cb)[:10])) / 10)
    assert top_overlap(a, b, 10) == pytest.approx(np.mean(expected))


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="two"):
        measure(torch.zeros(3, 4), torch.zeros(3, 5), views=4)
    assert describe({}) == []


def test_the_report_shows_reliability_and_warns_below_target() -> None:
    from pipeline.report import _reliability_block

    a, b = noisy_pair(100, 50, noise=1.0)
    low = _reliability_block(measure(a, b, views=8))
    assert "Reliability" in low and "median cos(w) of the same example" in low
    assert "Below target" in low and "projected at V = 32" in low
    high = _reliability_block(measure(a, a.clone(), views=8))
    assert "Below target" not in high
    assert "Not recorded" in _reliability_block({})
