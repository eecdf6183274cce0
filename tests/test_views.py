"""Common random views and the all-pairs consistency loss (SPEC section 2)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import ViewGenerator, common_view_seed, view_seed
from pipeline.config import AugmentConfig, InfluenceConfig, LossConfig, ModelConfig
from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.loss import consistency_loss
from pipeline.models import build_encoder

AUGMENT = AugmentConfig(size=28, flip_p=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0)


def brute_force_all_pairs(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        z = F.normalize(z, dim=-1)
    pairs = list(itertools.combinations(range(z.shape[1]), 2))
    return torch.stack([(z[:, a] - z[:, b]).pow(2).sum(-1) for a, b in pairs], 1).mean(1)


@pytest.mark.parametrize("kind", ["cosine", "l2"])
@pytest.mark.parametrize("num_views", [2, 3, 16])
def test_all_pairs_loss_is_the_mean_over_every_pair(kind: str, num_views: int) -> None:
    z = torch.randn(5, num_views, 7, dtype=torch.float64)
    expected = brute_force_all_pairs(z, kind)
    torch.testing.assert_close(consistency_loss(z, kind), expected, rtol=1e-10, atol=1e-12)


def test_pairs_estimator_pairs_consecutive_views() -> None:
    z = F.normalize(torch.randn(4, 6, 5, dtype=torch.float64), dim=-1)
    expected = sum((z[:, 2 * j] - z[:, 2 * j + 1]).pow(2).sum(-1) for j in range(3)) / 3
    torch.testing.assert_close(consistency_loss(z, "cosine", "pairs"), expected)
    with pytest.raises(ValueError, match="even number"):
        consistency_loss(z[:, :5], "cosine", "pairs")
    with pytest.raises(ValueError, match="estimator"):
        consistency_loss(z, "cosine", "triples")


def test_all_pairs_has_the_same_expectation_and_less_variance_than_pairs() -> None:
    # Representations scattered around a mean: both estimators are unbiased for
    # E||n(z) - n(z')||^2; the all-pairs one uses every pair of the same V draws.
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(1, 1, 8, dtype=torch.float64, generator=g)
    z = centre + 0.7 * torch.randn(20_000, 8, 8, dtype=torch.float64, generator=g)
    all_pairs, pairs = consistency_loss(z), consistency_loss(z, estimator="pairs")
    assert abs(all_pairs.mean() - pairs.mean()) < 3 * pairs.std() / len(z) ** 0.5
    assert all_pairs.var() < 0.75 * pairs.var()


def test_common_views_are_the_same_for_every_example(digits) -> None:
    gen = ViewGenerator(AUGMENT, 8, seed=3)
    image = digits[:1].expand(3, -1, -1, -1)
    views = gen(image, ["a", "b", "some/other key"])
    assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])
    # ... and distinct from one another, and from those of another seed
    flat = views[0].flatten(1)
    assert ((flat[:, None] - flat[None]).abs().amax(-1) + torch.eye(8) > 1e-3).all()
    other = ViewGenerator(AUGMENT, 8, seed=4)(image[:1], ["a"])
    assert not torch.equal(other[0], views[0])


def test_view_offsets_continue_one_stream(digits) -> None:
    for seeding in ("common", "key"):
        long = ViewGenerator(AUGMENT, 12, seed=1, seeding=seeding)(digits[:4], list("abcd"))
        tail = ViewGenerator(AUGMENT, 4, seed=1, seeding=seeding, offset=8)
        assert torch.equal(tail(digits[:4], list("abcd")), long[:, 8:])


def test_key_seeding_keeps_the_pair_layout_of_earlier_indices() -> None:
    gen = ViewGenerator(AUGMENT, 4, seed=5, seeding="key")
    assert gen.seeds(["x"]) == [view_seed(5, "x", j, side) for j in (0, 1) for side in (0, 1)]
    assert common_view_seed(5, 0) != common_view_seed(5, 1) != common_view_seed(6, 1)
    # Pinned: a changed hash silently changes every index built before it.
    assert common_view_seed(0, 0) == 17166638830587774812


def test_exact_copies_under_other_keys_get_identical_w(digits) -> None:
    def engine(seeding: str) -> InfluenceSSL:
        config = InfluenceConfig(
            model=ModelConfig(arch="tiny_cnn", in_channels=1),
            augment=AUGMENT,
            loss=LossConfig(num_views=6, view_seeding=seeding),
            device="cpu",
        )
        torch.manual_seed(0)
        return InfluenceSSL(build_encoder(config.model), config).fit(digits[:64])

    pair = torch.stack([digits[7], digits[7]])
    common = engine("common").embed(pair, ["original", "copy-under-another-key"])
    assert torch.equal(common[0], common[1])
    keyed = engine("key").embed(pair, ["original", "copy-under-another-key"])
    assert not torch.allclose(keyed[0], keyed[1])


def test_examples_per_batch_follows_the_number_of_views() -> None:
    config = InfluenceConfig(model=ModelConfig(arch="tiny_cnn", in_channels=1), device="cpu")
    torch.manual_seed(0)
    engine = InfluenceSSL(build_encoder(config.model), dataclasses.replace(config))
    assert engine.examples_per_batch() == config.views_per_batch // config.loss.num_views
    assert engine.use_views(64).examples_per_batch() == config.views_per_batch // 64
    fixed = InfluenceSSL(engine.encoder, dataclasses.replace(config, batch_size=5))
    assert fixed.examples_per_batch() == 5


def test_stratified_views_cover_every_stratum_once_per_block() -> None:
    from pipeline.augment import stratified_uniforms

    u = stratified_uniforms(3, 0, 16)
    assert u.shape[0] == 16 and ((u >= 0) & (u < 1)).all()
    strata = (u * 16).astype(int)
    assert all(sorted(strata[:, d]) == list(range(16)) for d in range(u.shape[1]))
    assert not (stratified_uniforms(3, 1, 16) == u).any()  # another block, another draw
    gen = ViewGenerator(dataclasses.replace(AUGMENT, flip_p=0.5), 16, 3, "stratified")
    assert int(gen.params(["a"], (28, 28)).flip.sum()) == 8  # exactly half flipped


def test_stratified_views_continue_in_blocks_of_the_index_views(digits) -> None:
    x = digits[:2]
    whole = ViewGenerator(AUGMENT, 48, 5, "stratified", block=16)(x, ["a", "b"])
    second = ViewGenerator(AUGMENT, 16, 5, "stratified", offset=16)(x, ["a", "b"])
    straddling = ViewGenerator(AUGMENT, 20, 5, "stratified", offset=12, block=16)(x, ["a", "b"])
    torch.testing.assert_close(whole[:, 16:32], second)
    torch.testing.assert_close(whole[:, 12:32], straddling)
    same = ViewGenerator(AUGMENT, 16, 5, "stratified")(x[[0, 0]], ["a", "z"])
    torch.testing.assert_close(same[0], same[1])  # common: the same views for every key
