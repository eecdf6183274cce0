"""Grouped / depthwise Conv2d, token Linear and MultiheadAttention against torch.func.

Each hooked projected gradient is checked against `P_out G P_in^T` of the exact per-example
gradient G (torch.func), with the tracker's own projections; then two tiny blocks
(MobileNet-like, ViT-like) end to end: no weight layer left out, and the engine's influence
equal to the exact damped Fisher inverse of the projected exact gradients.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LayerConfig, ProjectionConfig
from pipeline.fit import warn_if_untracked
from pipeline.influence.attention import attention_forward
from pipeline.influence.engine import InfluenceSSL, default_keys, frozen_parameters
from pipeline.influence.exact import damped_inverse_scores, exact_gradients
from pipeline.influence.layers import GroupedConv2dAdapter, adapter_for
from pipeline.influence.scoring import influence
from pipeline.influence.tracker import GradientTracker, coverage_warning
from pipeline.report import summary_section
from pipeline.testing import engine_config
from tests.test_gradients import hooked_gradients, views_of

# torch.func has no batching rule for CPU flash attention (the exact reference only).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

# ----------------------------------------------------------------------------- models


class GroupedNet(nn.Module):
    """A stem, then one grouped (or depthwise) convolution, then a Linear head."""

    def __init__(self, groups: int, out_mult: int = 1, stride=1, padding=1, bias=True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8 * out_mult, 3, stride, padding, groups=groups, bias=bias)
        self.head = nn.Linear(8 * out_mult * 4, 6)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.tanh(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


class TokenNet(nn.Module):
    """A patch embedding (kernel = stride = 4), then a Linear on [B, T, C] tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 4, stride=4)
        self.mix = nn.Linear(8, 12)
        self.head = nn.Linear(12, 6, bias=False)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(F.gelu(self.mix(tokens)).mean(1))


class AttentionNet(nn.Module):
    """Patch tokens into one MultiheadAttention: self-attention or one of its cross forms.

    mode "self": q = k = v; "kv": k = v != q; "qkv": three inputs; "separate": kdim and
    vdim differ from embed_dim (q/k/v_proj_weight). Token Linears run batch-first.
    """

    def __init__(self, mode: str, batch_first: bool, bias: bool = True, **attention) -> None:
        super().__init__()
        e = 8
        self.mode, self.batch_first, self.attention = mode, batch_first, attention
        self.patch = nn.Conv2d(1, e, 4, stride=4)
        dims = dict(kdim=6, vdim=5) if mode == "separate" else {}
        if mode != "self":
            self.key = nn.Linear(e, dims.get("kdim", e))
        if mode in ("qkv", "separate"):
            self.value = nn.Linear(e, dims.get("vdim", e))
        self.attn = nn.MultiheadAttention(e, 2, bias=bias, batch_first=batch_first, **dims)
        self.head = nn.Linear(e, 6)

    def forward(self, x):
        q = self.patch(x).flatten(2).transpose(1, 2)  # [B, T, E]
        if self.mode == "self":
            k = v = q
        elif self.mode == "kv":
            k = v = torch.tanh(self.key(q))
        else:
            k, v = torch.tanh(self.key(q)), torch.sin(self.value(q))
        if not self.batch_first:  # sequence-first, keeping which inputs are one tensor
            if self.mode == "self":
                q = k = v = q.transpose(0, 1)
            elif self.mode == "kv":
                q, k = q.transpose(0, 1), k.transpose(0, 1)
                v = k
            else:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, _ = self.attn(q, k, v, **self.attention)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


class MobileBlock(nn.Module):
    """Stem, then an inverted residual: pointwise, depthwise (stride 1), pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16)
        )
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        y = self.project(F.relu6(self.depthwise(F.relu6(self.expand(x)))))
        return self.head(F.adaptive_avg_pool2d(x + y, 1).flatten(1))


class TinyViT(nn.Module):
    """Patch embedding, position embedding, one pre-norm block (MHA + MLP), pooled head."""

    def __init__(self, e: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, e, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 36, e) * 0.1)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(e), nn.LayerNorm(e), nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(e, 2 * e), nn.Linear(2 * e, e)
        self.head = nn.Linear(e, 6)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x).mean(1))


# ----------------------------------------------------------------------------- helpers


def built(cls, *args, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = cls(*args, **kwargs).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def projected_exact(tracker: GradientTracker, exact: dict) -> dict:
    out = {}
    for layer in tracker.layers:
        g = exact[layer.name]
        g = g if layer.p_out is None else layer.p_out.to(g) @ g
        out[layer.name] = g if layer.p_in is None else g @ layer.p_in.to(g).T
    return out


def assert_matches_exact(model, views, projection: ProjectionConfig, layers=None, atol=1e-5):
    """Hooked G~ of every tracked layer == P_out G_exact P_in^T; returns the tracker."""
    tracker = GradientTracker(model, layers or LayerConfig(), projection)
    hooked = hooked_gradients(model, tracker, views, "cosine")
    expected = projected_exact(tracker, exact_gradients(model, views, tracker.names))
    for name in tracker.names:
        assert hooked[name].shape == expected[name].shape, name
        scale = expected[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(
            hooked[name].to(expected[name]), expected[name], atol=atol * scale, rtol=1e-4
        )
    return tracker


def assert_attention_matches_exact(model, views, projection, layers=None) -> dict:
    """As assert_matches_exact, with the model in float64.

    The views of these attention nets give nearly equal z, so the cosine loss's gradient
    is a small difference of large terms: in float32 the model's own rounding reaches 1e-4
    of the gradient, on the hooked and the exact side alike. In float64 only the hooks'
    float32 rows round (~1e-5 of the largest entry).
    """
    return assert_matches_exact(model.double(), views.double(), projection, layers, atol=1e-4)


PROJECTIONS = [ProjectionConfig(enabled=False), ProjectionConfig(dim_in=5, dim_out=3, seed=2)]


# ----------------------------------------------------------------------------- convolutions


@pytest.mark.parametrize("projection", PROJECTIONS, ids=["exact", "projected"])
@pytest.mark.parametrize(
    ("groups", "out_mult", "stride", "padding", "bias"),
    [(2, 1, 1, 1, True), (4, 2, 2, 0, False), (8, 1, 2, 1, True), (8, 2, 1, 1, False)],
    ids=["groups2", "groups4-x2-stride2", "depthwise-stride2", "depthwise-x2-nobias"],
)
def test_grouped_conv_matches_exact(digits, projection, groups, out_mult, stride, padding, bias):
    model = built(GroupedNet, groups, out_mult, stride, padding, bias)
    views = views_of(digits[:5], 3)
    tracker = assert_matches_exact(model, views, projection)
    layer = next(layer for layer in tracker.layers if layer.name == "grouped")
    assert isinstance(layer.adapter, GroupedConv2dAdapter)
    # The layout is the weight as stored, [O, C/groups*kh*kw (+1)].
    assert layer.features_in == 8 // groups * 9 + bias
    assert layer.features_out == 8 * out_mult
    assert tracker.skipped == {}


def test_grouped_conv_rows_keep_the_second_moments(digits):
    """The k x k rows per image have the moments of the positions x groups rows."""
    model = built(GroupedNet, 4, 2, 2, 1, True)
    tracker = GradientTracker(model, LayerConfig(include=["grouped"]), PROJECTIONS[1])
    layer = tracker.layers[0]
    seen = {}
    model.grouped.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach()))
    views = views_of(digits[:3], 2)
    batch = views.shape[0]
    with frozen_parameters(model), tracker.capture() as capture, torch.enable_grad():
        out = model.grouped(torch.tanh(model.stem(views.flatten(0, 1))))
        out.register_hook(lambda g: seen.update(g=g))
        z = model.head(F.adaptive_avg_pool2d(torch.relu(out), 2).flatten(1))
        z.reshape(batch, 2, -1).pow(2).sum().backward()
    rows = capture.rows(batch)["grouped"]
    # Explicit rows, one group at a time: a~ = P_in [patch; 1], d~ = P_out[:, group] delta.
    x, g = seen["x"], seen["g"].flatten(2)
    patches = F.unfold(x, 3, padding=1, stride=2)  # [N, C*9, L]
    a_rows, d_rows = [], []
    for group in range(4):
        a = patches[:, group * 18 : (group + 1) * 18]
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1).transpose(1, 2) @ layer.p_in.T
        d = g[:, group * 4 : (group + 1) * 4].transpose(1, 2)
        d = d @ layer.p_out[:, group * 4 : (group + 1) * 4].T
        a_rows.append(a)
        d_rows.append(d)
    a_rows = torch.cat(a_rows, 1).reshape(batch, -1, layer.dim_in)
    d_rows = torch.cat(d_rows, 1).reshape(batch, -1, layer.dim_out)
    positions = a_rows.shape[1] // 2  # per image: groups x locations
    for ours, explicit, k in [(rows.a, a_rows, layer.dim_in), (rows.d, d_rows, layer.dim_out)]:
        assert ours.shape == (batch, 2 * k, k)
        expected = explicit.transpose(1, 2) @ explicit
        moment = ours.transpose(1, 2) @ ours * positions / k
        torch.testing.assert_close(moment, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    gradient = torch.einsum("bro,bri->boi", d_rows, a_rows)
    scale = gradient.abs().max()
    torch.testing.assert_close(rows.gradient(), gradient, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("projection", PROJECTIONS, ids=["exact", "projected"])
def test_patch_embedding_and_token_linear_match_exact(digits, projection):
    tracker = assert_matches_exact(built(TokenNet), views_of(digits[:4], 3), projection)
    assert tracker.names == ["patch", "mix", "head"]


def test_grouped_conv_refuses_an_input_changed_in_place(digits):
    class InPlace(GroupedNet):
        def forward(self, x):
            h = torch.tanh(self.stem(x))
            y = self.grouped(h)
            h.mul_(2)  # the grouped layer's input, after it ran
            return self.head(F.adaptive_avg_pool2d(torch.relu(y) + h.mean(), 2).flatten(1))

    model = built(InPlace, 2)
    tracker = GradientTracker(model, LayerConfig(include=["grouped"]), ProjectionConfig())
    with pytest.raises(RuntimeError, match="modified in place"):
        hooked_gradients(model, tracker, views_of(digits[:2], 2), "cosine")


# ----------------------------------------------------------------------------- attention


ATTENTION_CASES = [
    ("self", True, True, {}),
    ("self", False, True, {}),
    ("self", True, False, {"need_weights": False}),
    ("kv", True, True, {}),
    ("kv", False, True, {"need_weights": False}),
    ("qkv", False, True, {}),
    ("separate", True, True, {}),
    ("separate", False, False, {}),
]
CASE_IDS = [
    f"{m}-{'bf' if b else 'sf'}-{'bias' if bias else 'nobias'}" for m, b, bias, _ in ATTENTION_CASES
]


@pytest.mark.parametrize("projection", PROJECTIONS, ids=["exact", "projected"])
@pytest.mark.parametrize(("mode", "batch_first", "bias", "kwargs"), ATTENTION_CASES, ids=CASE_IDS)
def test_attention_projections_match_exact(digits, projection, mode, batch_first, bias, kwargs):
    model = built(AttentionNet, mode, batch_first, bias, **kwargs)
    tracker = assert_attention_matches_exact(model, views_of(digits[:4], 3), projection)
    assert {"attn", "attn.out_proj"} <= set(tracker.names)
    attn = next(layer for layer in tracker.layers if layer.name == "attn")
    e = 8
    assert attn.features_out == 3 * e
    assert attn.features_in == (e if mode != "separate" else e + 6 + 5) + bias
    assert "forward" not in vars(model.attn)  # the capture put torch's forward back


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_with_a_mask_matches_exact(digits, batch_first):
    mask = torch.ones(36, 36, dtype=torch.bool).triu(1)  # causal, broadcast over the batch
    model = built(AttentionNet, "kv", batch_first, attn_mask=mask)
    assert_attention_matches_exact(model, views_of(digits[:4], 3), PROJECTIONS[1])


def test_out_proj_alone_is_tracked_through_its_attention(digits):
    model = built(AttentionNet, "kv", False)
    layers = LayerConfig(include=["attn.out_proj", "head"])
    tracker = assert_attention_matches_exact(model, views_of(digits[:3], 2), PROJECTIONS[1], layers)
    assert tracker.names == ["attn.out_proj", "head"]


@pytest.mark.parametrize(("mode", "batch_first", "bias", "kwargs"), ATTENTION_CASES, ids=CASE_IDS)
def test_attention_forward_equals_torch_bit_for_bit(mode, batch_first, bias, kwargs):
    torch.manual_seed(1)
    model = AttentionNet(mode, batch_first, bias, **kwargs).eval()
    mha = model.attn
    seen = []

    def watch_in(x, part, out):
        seen.append(part)
        return out

    x = torch.randn(3, 1, 24, 24)
    with torch.enable_grad():
        expected = model(x.requires_grad_(True))  # inputs needing grad: torch's slow path
        mha.forward = attention_forward(mha, watch_in, lambda heads, out: out)
        try:
            actual = model(x)
        finally:
            del mha.forward
    assert torch.equal(actual, expected)
    parts = {"self": ["qkv"], "kv": ["q", "kv"], "qkv": ["q", "k", "v"]}
    assert seen == parts.get(mode, ["q", "k", "v"])


# ----------------------------------------------------------------------------- end to end


# Two views (all pairs, seeded 1), 4 x 4 projections seeded 5, 24 px views.
SMALL = {
    "pairs": None,
    "dims": 4,
    "batch_size": 16,
    "loss": {"num_views": 2, "seed": 1},
    "projection": {"seed": 5},
}


@pytest.mark.parametrize("cls", [MobileBlock, TinyViT])
def test_blocks_track_every_weight_layer_and_match_exact_influence(digits, cls):
    model = built(cls)
    engine = InfluenceSSL(model, engine_config("dense_all", **SMALL))
    tracker = engine.tracker
    coverage = tracker.coverage()
    assert tracker.skipped == {}
    trackable = {"Conv2d", "Linear", "MultiheadAttention", "NonDynamicallyQuantizableLinear"}
    assert not [e for e in coverage["skipped_layers"] if e["type"] in trackable]
    if cls is TinyViT:
        assert {"attn", "attn.out_proj", "patch", "fc1", "fc2"} <= set(tracker.names)
        # Only the position embedding, a parameter of the root module, is outside w.
        assert [(e["name"], e["parameters"]) for e in coverage["skipped_layers"]] == [("", 288)]
    else:
        assert "depthwise.0" in tracker.names and coverage["skipped_layers"] == []
    counts = coverage["layer_parameters"]
    assert counts["tracked"] == sum(e["parameters"] for e in coverage["tracked_layers"])
    assert counts["weight"] == counts["tracked"] + counts["untracked"]
    assert counts["normalisation"] > 0
    warning = coverage_warning(coverage)  # 288 of this tiny ViT's 1,046 weights: a warning
    assert warning is None if cls is MobileBlock else "(root) (288: no per-example" in warning

    train, query = digits[:48], digits[500:510]
    train_keys, query_keys = default_keys(48), [f"q{i}" for i in range(10)]
    engine.fit(train, train_keys)
    scores = influence(engine.embed(query, query_keys), engine.embed(train, train_keys)).double()

    def flat(images, keys):
        exact = exact_gradients(model, engine.make_views(images, keys), tracker.names)
        projected = projected_exact(tracker, exact)
        return torch.cat([projected[n].flatten(1) for n in tracker.names], dim=1)

    expected = damped_inverse_scores(flat(train, train_keys), flat(query, query_keys))
    scale = expected.abs().max()
    torch.testing.assert_close(scores, expected, atol=2e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize("cls", [MobileBlock, TinyViT])
def test_blocks_fit_ekfac(digits, cls):
    """EK-FAC takes the grouped layers' moment rows and the attention's part rows."""
    engine = InfluenceSSL(built(cls), engine_config("ekfac", **SMALL)).fit(digits[:32])
    w = engine.embed(digits[500:504])
    assert w.shape == (4, engine.dimension) and torch.isfinite(w).all()


# ----------------------------------------------------------------------------- coverage


class Partly(nn.Module):
    """A reflect-padded conv (unsupported), a Conv1d (no adapter), a LayerNorm, an fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.conv1d = nn.Conv1d(4, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 6)
        self.extra = nn.Linear(4, 4)

    def forward(self, x):
        x = self.conv(x).flatten(2)
        x = self.norm(self.conv1d(x).mean(2))
        return self.fc(self.extra(x))


def test_coverage_names_what_is_left_out_and_why(caplog):
    model = built(Partly)
    tracker = GradientTracker(model, LayerConfig(exclude=["extra"]), ProjectionConfig())
    coverage = tracker.coverage()
    assert [e["name"] for e in coverage["tracked_layers"]] == ["fc"]
    assert coverage["tracked_layers"][0]["parameters"] == 4 * 6 + 6
    why = {e["name"]: e["why"] for e in coverage["skipped_layers"]}
    assert why["conv"].startswith("unsupported: padding_mode='reflect'")
    assert why["conv1d"] == "no per-example gradient for Conv1d parameters"
    assert why["extra"] == "not selected by layers.include / layers.exclude"
    assert "norm" not in why  # normalisation layers are not weight layers
    counts = coverage["layer_parameters"]
    assert counts == {
        "weight": 40 + 52 + 30 + 20,
        "tracked": 30,
        "untracked": 112,
        "untracked_fraction": 112 / 142,
        "normalisation": 8,
    }
    message = coverage_warning(coverage)
    assert message.startswith("79% of the encoder's weight parameters") and "conv1d" in message
    with caplog.at_level(logging.WARNING, logger="pipeline.fit"):
        warn_if_untracked(coverage)
    assert any("not tracked" in r.getMessage() for r in caplog.records)


def test_report_summary_shows_tracked_and_untracked_layers():
    coverage = GradientTracker(
        built(Partly), LayerConfig(exclude=["extra"]), ProjectionConfig()
    ).coverage()
    coverage["skipped_layers"][0]["name"] = "<b>conv</b>"
    manifest = {"fingerprint": {"layers": [{"name": "fc"}]}, "shards": [], **coverage}
    index = SimpleNamespace(manifest=manifest, storage=SimpleNamespace(uri="mem://x"))
    html = summary_section(index, None)[0].html()
    assert "1 (30 parameters; 78.9% of the weight parameters untracked" in html
    assert "<h3>Untracked layers</h3>" in html and "&lt;b&gt;conv&lt;/b&gt;" in html
    assert "no per-example gradient for Conv1d parameters" in html
    # An index fitted before coverage was recorded: the count alone, no table.
    old = SimpleNamespace(
        manifest={"fingerprint": manifest["fingerprint"], "shards": []}, storage=index.storage
    )
    html = summary_section(old, None)[0].html()
    assert "Untracked layers" not in html


def test_adapter_for_grouped_and_attention_types():
    assert isinstance(adapter_for(nn.Conv2d(4, 4, 3, groups=2)), GroupedConv2dAdapter)
    mha = nn.MultiheadAttention(8, 2)
    assert adapter_for(mha.out_proj) is adapter_for(nn.Linear(2, 2))
    assert adapter_for(mha).parameter_names(mha) == ["in_proj_weight", "in_proj_bias"]
