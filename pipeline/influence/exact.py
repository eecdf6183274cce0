"""Ground truth for tests and benchmarks: exact per-example gradients by `torch.func`.

Slow and memory-hungry by design (every per-example gradient is materialised); used to
verify the hook-based projected gradients and the curvature approximations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.config import CurvatureConfig
from pipeline.influence.layers import adapter_for
from pipeline.influence.loss import consistency_loss


def exact_gradients(
    model: nn.Module,
    views: torch.Tensor,
    layer_names: list[str],
    kind: str = "cosine",
    estimator: str = "all_pairs",
) -> dict[str, torch.Tensor]:
    """{layer: [B, O, I(+1)]} exact per-example gradients of the consistency loss.

    `views` is [B, V, C, H, W]. The layout is each layer's adapter's (`gradient_layout`):
    the weight flattened to [O, I] (conv: I = C/groups*kh*kw) with the bias gradient as an
    extra last column; MultiheadAttention: its in-projection, [3E, I(+1)].
    """
    model = model.eval()
    modules = dict(model.named_modules())
    adapters = {name: adapter_for(modules[name]) for name in layer_names}
    tracked = {
        f"{name}.{part}": getattr(modules[name], part).detach()
        for name in layer_names
        for part in adapters[name].parameter_names(modules[name])
    }
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in tracked}
    fixed.update(dict(model.named_buffers()))

    def loss_of(params: dict[str, torch.Tensor], example_views: torch.Tensor) -> torch.Tensor:
        z = functional_call(model, {**fixed, **params}, (example_views,))
        return consistency_loss(z[None], kind, estimator)[0]

    grads = vmap(grad(loss_of), in_dims=(None, 0))(tracked, views)
    out = {}
    for name in layer_names:
        module, adapter = modules[name], adapters[name]
        parts = {part: grads[f"{name}.{part}"] for part in adapter.parameter_names(module)}
        out[name] = adapter.gradient_layout(module, parts)
    return out


def damped_inverse_scores(
    train: torch.Tensor,
    query: torch.Tensor,
    damping_factor: float | None = None,
    spanned: bool = True,
) -> torch.Tensor:
    """Exact `g_q^T (F + lambda I)^-1 g_t` with F = E[g g^T] over `train` [N, P] (float64).

    lambda = damping_factor * trace(F) / min(N, P), the mean eigenvalue over the directions
    N examples can span: the default ("spanned") damping of the curvature options, with
    their default factor unless given (with `spanned=False`, trace(F) / P, their "relative"
    damping). Returns [Q, N].
    """
    if damping_factor is None:
        damping_factor = CurvatureConfig().damping
    train, query = train.to(torch.float64), query.to(torch.float64)
    fisher = train.T @ train / train.shape[0]
    span = min(train.shape[0], fisher.shape[0]) if spanned else fisher.shape[0]
    lam = damping_factor * torch.trace(fisher) / span
    eye = torch.eye(fisher.shape[0], dtype=torch.float64)
    solved = torch.linalg.solve(fisher + lam * eye, train.T)
    return query @ solved
