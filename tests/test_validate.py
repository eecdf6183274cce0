"""`validate`: the LDS machinery on synthetic datamodels, and a toy-size run on real digits."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from scipy.stats import spearmanr

from pipeline.demo.validate import (
    METHODS,
    ValidateConfig,
    ceiling,
    lds,
    null_lds,
    removal_sets,
    run_validate,
    seed_agreement,
    spearman,
    subset_masks,
)
from pipeline.train import TrainConfig


def test_spearman_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (5, 30), generator=generator).float()  # many ties
    b = a + torch.randn(5, 30, generator=generator) * 2
    ours = spearman(a, b)
    for row in range(5):
        expected = spearmanr(a[row].numpy(), b[row].numpy()).statistic
        assert ours[row].item() == pytest.approx(expected, abs=1e-12)
    assert spearman(torch.ones(1, 30), b[:1]).item() == 0.0  # constant: no ranking


def synthetic_datamodel(noise: float, seed: int = 0):
    """Losses generated exactly by a linear datamodel with known per-example effects."""
    generator = torch.Generator().manual_seed(seed)
    config = ValidateConfig(subsets=30, fraction=0.5, seed=seed)
    masks = subset_masks(200, config)
    effects = torch.randn(20, 200, generator=generator)  # [Q, N]: positive lowers the loss
    losses = 1.0 - masks @ effects.T  # [M, Q]
    losses += noise * losses.std() * torch.randn(losses.shape, generator=generator)
    return masks, effects, losses


def test_lds_recovers_the_effects_of_a_linear_datamodel():
    masks, effects, losses = synthetic_datamodel(noise=0.0)
    assert torch.allclose(lds(effects, masks, losses), torch.ones(20, dtype=torch.float64))
    # The sign convention is checked too: the opposite scores give exactly -1.
    assert torch.allclose(lds(-effects, masks, losses), -torch.ones(20, dtype=torch.float64))
    noisy_masks, noisy_effects, noisy_losses = synthetic_datamodel(noise=0.5, seed=1)
    assert 0.6 < lds(noisy_effects, noisy_masks, noisy_losses).mean() < 0.99


def test_random_scores_sit_at_the_null():
    masks, effects, losses = synthetic_datamodel(noise=0.0)
    generator = torch.Generator().manual_seed(5)
    independent = null_lds(masks, losses, 200, generator, shared=False)
    shared = null_lds(masks, losses, 200, generator, shared=True)
    # A mean of 20 x Spearman over 30 subsets: sd near 1 / sqrt(20 * 29) when independent.
    assert abs(float(independent.mean())) < 0.02
    assert 0.5 / math.sqrt(20 * 29) < float(independent.std()) < 2 / math.sqrt(20 * 29)
    assert float(shared.std()) > 0
    random_scores = torch.randn(effects.shape, generator=generator)
    z = (lds(random_scores, masks, losses).mean() - independent.mean()) / independent.std()
    assert abs(float(z)) < 4
    true_z = (lds(effects, masks, losses).mean() - independent.mean()) / independent.std()
    assert true_z > 10


def test_seed_agreement_tracks_the_share_of_seed_noise():
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(40, 1, 10, generator=generator)
    noise = torch.randn(40, 4, 10, generator=generator)
    agree_clean = seed_agreement(signal + 0.05 * noise)
    agree_noisy = seed_agreement(signal + 3.0 * noise)
    agree_pure = seed_agreement(noise)
    assert agree_clean > 0.95 > agree_noisy > agree_pure
    assert abs(agree_pure) < 0.2
    assert seed_agreement(noise[:, :1]) is None
    assert ceiling(agree_clean) == pytest.approx(math.sqrt(2 * agree_clean / (1 + agree_clean)))
    assert ceiling(-0.1) == 0.0


def test_removal_sets_drop_the_ranked_examples():
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 2.0, 8.0, 4.0, 6.0])
    config = ValidateConfig(removal_fraction=0.2, removal_draws=2)
    runs = dict((name, kept) for name, kept in removal_sets(scores, config) if name != "random")
    assert sorted(runs["full"].tolist()) == list(range(10))
    assert set(range(10)) - set(runs["top"].tolist()) == {2, 7}  # scores 9 and 8
    assert set(range(10)) - set(runs["bottom"].tolist()) == {5, 1}  # scores 0 and 1
    randoms = [kept for name, kept in removal_sets(scores, config) if name == "random"]
    assert len(randoms) == 2 and all(len(kept) == 8 for kept in randoms)


def test_validate_toy_run_on_real_digits(tmp_path):
    config = ValidateConfig(
        out=str(tmp_path),
        num_train=120,
        num_queries=8,
        num_probe=100,
        subsets=5,
        seeds=2,
        null_draws=50,
        removal_fraction=0.1,
        removal_seeds=2,
        removal_draws=1,
        probe_steps=30,
        train=TrainConfig(steps=4, batch_size=32),
    )
    config.influence = dataclasses.replace(config.influence, batch_size=64)
    result = run_validate(config, command="toy")

    summary = result["lds"]
    assert set(summary["methods"]) == set(METHODS)
    assert summary["methods"]["influence"]["curvature"] == "dense_all"
    assert summary["methods"]["gradient_dot"]["curvature"] == "identity"
    for method in summary["methods"].values():
        assert -1 <= method["lds"] <= 1
        assert math.isfinite(method["z_independent"]) and math.isfinite(method["z_shared"])
    for null in summary["null"].values():
        assert -1 <= null["mean"] <= 1 and null["sd"] > 0
    assert -1 <= summary["seed_agreement"] <= 1 and 0 <= summary["ceiling"] <= 1
    assert -1 <= summary["query_loss_correlation"] <= 1
    assert 0 < summary["mean_query_loss"] <= 4  # 2 - 2 cos

    removal = result["removal"]
    assert removal["removed"] == 12
    for name, condition in removal["conditions"].items():
        runs = 2 if name != "random" else 2 * config.removal_draws
        assert len(condition["accuracies"]) == runs
        assert all(0 <= a <= 1 for a in condition["accuracies"])
        assert condition["sd"] >= 0
    assert 0 <= result["reference_probe_accuracy"] <= 1

    written = json.loads((tmp_path / "validate.json").read_text())
    assert written["lds"]["methods"].keys() == summary["methods"].keys()
    text = (tmp_path / "validate.md").read_text()
    assert "Reproduce: `toy`" in text and "| influence | dense_all |" in text
    assert (tmp_path / "validate.safetensors").stat().st_size > 0


def test_validate_runs_as_a_cli_verb(tmp_path):
    from pipeline.cli import main

    settings = [
        f"out={tmp_path}",
        "num_train=60",
        "num_queries=4",
        "num_probe=40",
        "subsets=3",
        "seeds=1",
        "null_draws=10",
        "removal_seeds=1",
        "removal_draws=1",
        "probe_steps=5",
        "train.steps=2",
        "train.batch_size=16",
    ]
    assert main(["validate", *[arg for s in settings for arg in ("--set", s)]]) == 0
    written = json.loads((tmp_path / "validate.json").read_text())
    assert set(written["lds"]["methods"]) == set(METHODS)
