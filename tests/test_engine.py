"""The in-memory API: determinism, shapes, scoring and the demo path."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import (
    AugmentConfig,
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    ProjectionConfig,
    load_config,
)
from pipeline.influence.engine import InfluenceSSL, default_keys
from pipeline.influence.scoring import influence, self_influence, top_k
from pipeline.models import build_encoder
from pipeline.train import TrainConfig, train_ssl


def small_config(batch_size: int = 32) -> InfluenceConfig:
    return InfluenceConfig(
        model=ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[16, 8],
            kwargs={"width": 4, "out_dim": 16},
        ),
        augment=AugmentConfig(size=28, flip_p=0.0),
        loss=LossConfig(num_views=4),
        projection=ProjectionConfig(dim_in=8, dim_out=4),
        batch_size=batch_size,
        device="cpu",
    )


@pytest.fixture(scope="module")
def fitted(digits):
    torch.manual_seed(0)
    encoder = build_encoder(small_config().model)
    return InfluenceSSL(encoder, small_config()).fit(digits[:200])


def test_w_of_an_example_does_not_depend_on_its_batch(fitted, digits):
    keys = default_keys(60)
    reference = fitted.embed(digits[:60], keys)
    other = InfluenceSSL(fitted.encoder, small_config(batch_size=7))
    other.curvature.load_state_dict(fitted.curvature.state_dict(), fitted.curvature.completed)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    shuffled = other.embed(digits[:60][order], [keys[i] for i in order])
    torch.testing.assert_close(shuffled, reference[order], rtol=1e-4, atol=1e-5)
    assert reference.shape == (60, fitted.dimension)
    assert fitted.tracker.names[-1] == "projector.layers.3"


@pytest.mark.parametrize("kind", ["dense_all", "dense", "ekfac"])
def test_fit_embed_is_fit_then_embed(digits, kind):
    """One pass (dense: the fit pass keeps the gradients it sums and whitens them) or two
    (EK-FAC), fit_embed gives the w and the curvature of fit then embed."""
    config = small_config(batch_size=16)
    config.curvature.kind = kind
    torch.manual_seed(0)
    encoder = build_encoder(config.model)
    images, keys = digits[:90], default_keys(90)
    two = InfluenceSSL(encoder, config).fit(images, keys)
    one = InfluenceSSL(encoder, config)
    w = one.fit_embed(images, keys)
    assert one.curvature.kind == two.curvature.kind and one.curvature.fitted
    torch.testing.assert_close(w, two.embed(images, keys), rtol=1e-5, atol=1e-6)
    state = two.curvature.state_dict()
    for name, tensor in one.curvature.state_dict().items():
        torch.testing.assert_close(tensor, state[name])
    # Fitted already: fit_embed fits nothing more and embeds with the curvature it has.
    torch.testing.assert_close(one.fit_embed(images[:20], keys[:20]), w[:20])


def test_scores_are_inner_products_and_self_influence_is_the_diagonal(fitted, digits):
    w = fitted.embed(digits[:30])
    scores = influence(w, w)
    torch.testing.assert_close(torch.diagonal(scores), self_influence(w))
    cosine = influence(w, w, normalized=True)
    torch.testing.assert_close(torch.diagonal(cosine), torch.ones(30), rtol=1e-5, atol=1e-5)
    proponents, opponents = top_k(cosine, 3)
    assert (proponents[:, 0] == torch.arange(30)).all()  # each example is its own top match
    assert (cosine.gather(1, opponents) <= cosine.gather(1, proponents[:, -1:])).all()


def test_keys_must_match_images(fitted, digits):
    with pytest.raises(ValueError, match="5 images but 4 keys"):
        fitted.embed(digits[:5], ["a", "b", "c", "d"])


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("curvature:\n  kind: dense\nprojection:\n  dim_in: 8\n")
    cfg = load_config(
        InfluenceConfig, path, ["projection.dim_out=4", "augment.crop_scale=[0.5, 1]"]
    )
    assert cfg.curvature.kind == "dense"
    assert (cfg.projection.dim_in, cfg.projection.dim_out) == (8, 4)
    assert cfg.augment.crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="unknown setting"):
        load_config(InfluenceConfig, None, ["projection.dims=3"])


def test_bf16_autocast_keeps_w_close_to_float32_on_a_trained_encoder(digits):
    # The loss compares two views' representations; on an untrained net they nearly agree
    # (loss ~1e-7) and bf16 rounding swamps the difference. A trained encoder is the use case.
    torch.manual_seed(0)
    encoder = build_encoder(small_config().model)
    train_ssl(encoder, digits, small_config().augment, TrainConfig(steps=60, batch_size=64))
    reference = InfluenceSSL(encoder, small_config()).fit(digits[:200])
    config = small_config()
    config.autocast = "bf16"
    bf16 = InfluenceSSL(encoder, config)
    bf16.curvature.load_state_dict(reference.curvature.state_dict(), reference.curvature.completed)
    batch, _ = bf16.project_views(bf16.make_views(digits[:4], ["a", "b", "c", "d"]))
    assert batch.rows["backbone.conv2"].parts[0].held_d.dtype == torch.bfloat16  # bf16 rows
    w16, w32 = bf16.embed(digits[:60]), reference.embed(digits[:60])
    assert w16.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(w16, w32, dim=1)
    # Measured: median 0.998, mean 0.989, min 0.90 (the examples of lowest loss).
    assert cosine.median() >= 0.99 and cosine.mean() > 0.95, cosine
    assert not torch.equal(w16, w32)  # the forward really ran in bf16


def test_a_partial_section_override_keeps_the_parents_defaults():
    from pipeline.demo import DemoConfig

    demo = load_config(DemoConfig, None, ["influence.loss.num_views=8", "train.steps=7"])
    default = DemoConfig()
    assert demo.influence.loss.num_views == 8
    assert demo.influence.model == default.influence.model  # still the demo's small CNN
    assert demo.influence.augment == default.influence.augment
    assert (demo.train.steps, demo.train.batch_size) == (7, default.train.batch_size)
    assert load_config(DemoConfig, None, []) == default


def test_the_example_job_config_loads():
    from pathlib import Path

    from pipeline.config import PipelineConfig

    path = Path(__file__).parents[1] / "infra" / "job.example.yaml"
    config = load_config(PipelineConfig, path)
    assert config.influence.model.arch == "resnet50"
    assert config.index.search.kind == "auto" and config.index.vector_dtype == "float16"
