"""Hook-based per-example gradients against torch.func ground truth (SPEC section 2)."""

from __future__ import annotations

import pytest
import torch

from pipeline.augment import ViewGenerator
from pipeline.config import AugmentConfig, LayerConfig, ProjectionConfig
from pipeline.influence.engine import frozen_parameters
from pipeline.influence.exact import exact_gradients
from pipeline.influence.loss import consistency_loss
from pipeline.influence.tracker import GradientTracker

LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def views_of(images: torch.Tensor, num_views: int, seeding: str = "key") -> torch.Tensor:
    generator = ViewGenerator(AugmentConfig(size=24), num_views, seed=7, seeding=seeding)
    return generator(images, [f"k{i}" for i in range(len(images))])


def hooked_gradients(model, tracker, views, kind, estimator="all_pairs"):
    batch = views.shape[0]
    with frozen_parameters(model), tracker.capture() as capture, torch.enable_grad():
        z = model(views.flatten(0, 1)).reshape(batch, views.shape[1], -1)
        consistency_loss(z, kind, estimator).sum().backward()
    return {name: rows.gradient() for name, rows in capture.rows(batch).items()}


@pytest.mark.parametrize("kind", ["cosine", "l2"])
@pytest.mark.parametrize(
    ("estimator", "num_views", "seeding"),
    [("pairs", 2, "key"), ("pairs", 6, "key"), ("all_pairs", 3, "common"), ("all_pairs", 8, "key")],
)
def test_unprojected_hook_gradients_equal_exact(
    mixed_net, digits, kind, estimator, num_views, seeding
):
    views = views_of(digits[:6], num_views, seeding)
    tracker = GradientTracker(mixed_net, LayerConfig(), ProjectionConfig(enabled=False))
    assert tracker.names == LAYERS
    hooked = hooked_gradients(mixed_net, tracker, views, kind, estimator)
    exact = exact_gradients(mixed_net, views, LAYERS, kind, estimator)
    for name in LAYERS:
        assert hooked[name].shape == exact[name].shape
        scale = exact[name].abs().max()
        assert scale > 0
        torch.testing.assert_close(hooked[name], exact[name], atol=1e-5 * scale, rtol=1e-4)


def test_projected_gradients_equal_projection_of_exact(mixed_net, digits):
    views = views_of(digits[:5], 4)
    projection = ProjectionConfig(dim_in=5, dim_out=2, seed=3)
    tracker = GradientTracker(mixed_net, LayerConfig(), projection)
    hooked = hooked_gradients(mixed_net, tracker, views, "cosine")
    exact = exact_gradients(mixed_net, views, LAYERS, "cosine")
    for layer in tracker.layers:
        assert layer.p_in is not None and layer.p_out is not None
        expected = layer.p_out @ exact[layer.name] @ layer.p_in.T
        assert hooked[layer.name].shape == (5, 2, 5)
        scale = expected.abs().max()
        torch.testing.assert_close(hooked[layer.name], expected, atol=1e-5 * scale, rtol=1e-4)


def test_projection_is_identity_where_dim_exceeds_features(mixed_net):
    projection = ProjectionConfig(dim_in=12, dim_out=5, per_layer={"fc2": [100, 100]})
    tracker = GradientTracker(mixed_net, LayerConfig(), projection)
    by_name = {layer.name: layer for layer in tracker.layers}
    assert by_name["conv1"].p_in is None  # 1*3*3 + 1 = 10 inputs <= 12
    assert by_name["conv1"].p_out is None  # 3 outputs <= 5
    assert by_name["conv2"].p_in.shape == (12, 27)
    assert by_name["fc2"].p_in is None and by_name["fc2"].p_out is None
    assert tracker.dimension == 10 * 3 + 12 * 4 + 12 * 5 + 8 * 6


def test_projection_matrices_regenerate_identically(mixed_net):
    first = GradientTracker(mixed_net, LayerConfig(), ProjectionConfig(dim_in=4, dim_out=2))
    again = GradientTracker(mixed_net, LayerConfig(), ProjectionConfig(dim_in=4, dim_out=2))
    other = GradientTracker(mixed_net, LayerConfig(), ProjectionConfig(dim_in=4, dim_out=2, seed=1))
    for a, b, c in zip(first.layers, again.layers, other.layers, strict=True):
        assert torch.equal(a.p_in, b.p_in) and torch.equal(a.p_out, b.p_out)
        assert not torch.equal(a.p_in, c.p_in)
    # Different layers of equal shape still get different matrices.
    assert not torch.equal(first.layers[2].p_out, first.layers[3].p_out[:2])


def test_layer_selection_by_patterns(mixed_net):
    tracker = GradientTracker(mixed_net, LayerConfig(include=["fc*"]), ProjectionConfig())
    assert tracker.names == ["fc1", "fc2"]
    tracker = GradientTracker(mixed_net, LayerConfig(exclude=["conv*"]), ProjectionConfig())
    assert tracker.names == ["fc1", "fc2"]
    with pytest.raises(ValueError, match=r"no layer selected.*conv1"):
        GradientTracker(mixed_net, LayerConfig(include=["nothing*"]), ProjectionConfig())


class InplaceNet(torch.nn.Module):
    """An in-place ReLU straight after the first tracked layer, and an untracked stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.conv = torch.nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        x = self.relu(self.conv(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_graph_starts_at_first_tracked_layer(digits):
    torch.manual_seed(0)
    model = InplaceNet().eval()
    views = views_of(digits[:4], 2)
    tracker = GradientTracker(
        model, LayerConfig(include=["conv", "fc"]), ProjectionConfig(enabled=False)
    )
    hooked = hooked_gradients(model, tracker, views, "cosine")
    exact = exact_gradients(model, views, ["conv", "fc"], "cosine")
    for name in ("conv", "fc"):
        scale = exact[name].abs().max()
        torch.testing.assert_close(hooked[name], exact[name], atol=1e-5 * scale, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients computed
