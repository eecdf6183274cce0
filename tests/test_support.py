"""`pipeline.testing`: the helpers the tests and benchmarks share behave as they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, LossConfig, ProjectionConfig
from pipeline.demo.validate import spearman as rowwise_spearman
from pipeline.testing import clustered, engine_config, spearman, top_overlap


def test_engine_config_merges_sections_onto_its_shortcuts():
    config = engine_config("ekfac", pairs=3, dims=4, damping=0.5, loss={"seed": 7})
    assert config.loss == LossConfig(num_views=6, estimator="pairs", seed=7)
    assert (config.projection.dim_in, config.projection.dim_out) == (4, 4)
    assert (config.curvature.kind, config.curvature.damping) == ("ekfac", 0.5)
    assert config.device == "cpu"
    exact = engine_config(pairs=None, dims=None, augment=AugmentConfig(size=20, flip_p=0.0))
    assert exact.loss == LossConfig() and exact.projection == ProjectionConfig(enabled=False)
    assert exact.augment == AugmentConfig(size=20, flip_p=0.0)
    assert engine_config(augment=28).augment == AugmentConfig(size=28)


def test_clustered_points_share_given_centres_and_continue_a_stream():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 8))
    first = clustered(50, 8, centres, rng, spread=0.01)
    second = clustered(50, 8, centres, rng, spread=0.01)
    assert first.dtype == np.float32 and first.shape == (50, 8)
    assert not np.array_equal(first, second)  # the stream went on
    # Tight clusters: every point's direction is one of the centres'.
    unit = clustered(200, 8, centres, 1, spread=0.01, unit=True)
    cosine = unit @ (centres / np.linalg.norm(centres, axis=1, keepdims=True)).T
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    assert cosine.max(axis=1).min() > 0.99
    norms = np.linalg.norm(clustered(200, 8, 4, 2), axis=1)
    assert norms.max() > 2 * norms.min()  # spread in norm: inner product is not cosine
    with pytest.raises(ValueError, match="dimension"):
        clustered(5, 3, centres)


def test_spearman_ranks_ties_like_the_validation_code():
    a = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 5.0, 5.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 2.0, 0.0, 2.0], [3.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    expected = float(rowwise_spearman(a.flatten(), b.flatten()))
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)


def test_top_overlap_counts_shared_top_entries():
    scores = torch.arange(12.0).reshape(2, 6)
    assert top_overlap(scores, scores, k=3) == 1.0
    assert top_overlap(scores, -scores, k=3) == 0.0
    shifted = scores.clone()
    shifted[:, 5] = -1  # each row loses one of its three largest
    assert top_overlap(shifted, scores, k=3) == pytest.approx(2 / 3)
