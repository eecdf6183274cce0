"""The contract every curvature option keeps: passes of mergeable sums, then whitening.

A curvature is fitted by running its `passes` in order. For each pass, every worker calls
`accumulate` on its batches into its own `Statistics`; the partials are merged; one call to
`complete_pass` turns the merged sums into factors. After the last pass, `whiten` maps
per-example projected gradients to `w(x)`, with `<w(q), w(t)> = g_q^T (F + lambda)^-1 g_t`
for that option's approximation F of the empirical Fisher.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pipeline.config import CurvatureConfig
from pipeline.errors import UserError
from pipeline.influence.statistics import Statistics
from pipeline.influence.tracker import LayerRows


@dataclass(frozen=True)
class LayerShape:
    """A tracked layer as the curvature sees it: its projected gradient is [dim_out, dim_in]."""

    name: str
    dim_in: int
    dim_out: int

    @property
    def size(self) -> int:
        return self.dim_in * self.dim_out


class ProjectedBatch:
    """Per-layer projected rows of a batch, and its per-example gradients (computed once)."""

    def __init__(
        self,
        rows: dict[str, LayerRows] | None = None,
        gradients: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if rows is None and gradients is None:
            raise ValueError("a ProjectedBatch needs rows or gradients")
        self.rows = rows
        self._gradients = gradients

    def gradients(self) -> dict[str, torch.Tensor]:
        """{layer: G~ [B, dim_out, dim_in]}."""
        if self._gradients is None:
            self._gradients = {name: r.gradient() for name, r in self.rows.items()}
        return self._gradients

    def require_rows(self) -> dict[str, LayerRows]:
        if self.rows is None:
            raise ValueError("this pass needs the projected rows, not only gradients")
        return self.rows

    @property
    def num_examples(self) -> int:
        return next(iter(self.gradients().values())).shape[0]


class ZeroCurvatureError(UserError, ValueError):
    """The fitted curvature is all zeros or not finite, so w(x) would be NaN (or all 0)."""


def check_fitted(moments: dict[str, torch.Tensor], examples: int | None = None) -> None:
    """Refuse fitted moments {what: matrix or spectrum} that are not finite or all zero.

    A zero Fisher means every per-example gradient of those layers was zero: whitening
    would divide 0 by sqrt(0 + lambda = 0), i.e. NaN, and with absolute damping give w = 0.
    A matrix is a second moment (positive semi-definite), so its diagonal tells both.
    """
    over = f"the {examples} fit examples" if examples else "the fit sample"
    moments = {what: m.diagonal() if m.dim() == 2 else m for what, m in moments.items()}
    bad = [what for what, m in moments.items() if not bool(torch.isfinite(m).all())]
    if bad:
        raise ZeroCurvatureError(
            f"the fitted curvature of {_named(bad)} is not finite (NaN or inf gradients over "
            f"{over}): check model.checkpoint, and fit without autocast (autocast=none)"
        )
    zero = [what for what, m in moments.items() if int(m.count_nonzero()) == 0]
    if zero:
        raise ZeroCurvatureError(
            f"the per-example gradients of {_named(zero)} are all zero over {over}, so the "
            "fitted curvature is zero and w(x) would be NaN: the encoder's output does not "
            "change with the views (an untrained model, or a checkpoint that did not load?); "
            "check model.checkpoint and augment, or leave those layers out with "
            "influence.layers.exclude"
        )


def _named(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


DAMPING_MODES = ("spanned", "relative", "absolute")


def damping(eigenvalues: torch.Tensor, config: CurvatureConfig, examples: int = 0) -> float:
    """lambda from the fitted spectrum.

    "spanned" (default): `factor * trace / min(examples, dim)`, the mean eigenvalue over the
    at most `examples` directions a fit on that many examples can span. When the fit sample
    is smaller than the dimension, the plain mean over all `dim` eigenvalues ("relative")
    counts the null space and falls far below the spectrum the fit did see, so whitening
    then amplifies the unfitted directions, i.e. the view noise. With examples >= dim both
    rules agree. "absolute": `factor` itself.
    """
    if config.damping_mode == "spanned":
        span = min(examples, eigenvalues.numel()) if examples > 0 else eigenvalues.numel()
        return float(config.damping * eigenvalues.sum() / span)
    if config.damping_mode == "relative":
        return float(config.damping * eigenvalues.mean())
    if config.damping_mode == "absolute":
        return float(config.damping)
    raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, not {config.damping_mode!r}")


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition in float64 of the symmetrised matrix, eigenvalues clipped at 0.

    The vectors are made row-major, as they are after a round trip through the factors
    file: eigh returns them column-major, and a matmul against the other layout rounds
    differently, so w fitted in memory would differ in the last bits from a worker's.
    """
    matrix = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.clamp_min(0.0), vectors.contiguous()


class Curvature(ABC):
    kind: str = ""
    passes: tuple[str, ...] = ()
    # Its passes read only the per-example gradients, which whitening reads too: one pass
    # over the network can both fit it and embed (`InfluenceSSL.fit_embed`).
    gradients_only: bool = False

    def __init__(self, layers: list[LayerShape], config: CurvatureConfig) -> None:
        if not layers:
            raise ValueError("a curvature needs at least one layer")
        self.layers = list(layers)
        self.config = config
        self.completed: list[str] = []
        self._cast: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def fitted(self) -> bool:
        return self.completed == list(self.passes)

    @property
    def dimension(self) -> int:
        return sum(layer.size for layer in self.layers)

    def next_pass(self) -> str | None:
        remaining = [p for p in self.passes if p not in self.completed]
        return remaining[0] if remaining else None

    def cast_factors(
        self, name: object, factors: dict[str, torch.Tensor], like: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """`factors` on `like`'s device and dtype, converted once and kept (not per batch)."""
        key = (name, like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = {k: v.to(like.device, like.dtype) for k, v in factors.items()}
        return self._cast[key]

    def _check_pass(self, pass_name: str) -> None:
        if pass_name != self.next_pass():
            raise ValueError(
                f"{self.kind}: pass {pass_name!r} out of order; next is {self.next_pass()!r}"
            )

    def accumulate(self, pass_name: str, stats: Statistics, batch: ProjectedBatch) -> None:
        self._check_pass(pass_name)
        self._accumulate(pass_name, stats, batch)

    def complete_pass(self, pass_name: str, stats: Statistics) -> None:
        self._check_pass(pass_name)
        self._complete(pass_name, stats)
        self.completed.append(pass_name)
        self._cast.clear()

    def whiten(self, gradients: dict[str, torch.Tensor]) -> torch.Tensor:
        """w(x) [B, dimension] from {layer: G~ [B, dim_out, dim_in]}."""
        if not self.fitted:
            raise RuntimeError(
                f"{self.kind} curvature is not fitted (passes done: {self.completed})"
            )
        missing = [layer.name for layer in self.layers if layer.name not in gradients]
        if missing:
            raise ValueError(f"gradients missing for layers {missing[:5]}")
        return self._whiten(gradients)

    @abstractmethod
    def _accumulate(self, pass_name: str, stats: Statistics, batch: ProjectedBatch) -> None: ...

    @abstractmethod
    def _complete(self, pass_name: str, stats: Statistics) -> None: ...

    @abstractmethod
    def _whiten(self, gradients: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The factors fitted so far, as named tensors (no pickle)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor], completed: list[str]) -> None: ...

    def to(self, device: torch.device | str) -> Curvature:
        state = {k: v.to(device) for k, v in self.state_dict().items()}
        self.load_state_dict(state, list(self.completed))
        return self


def flatten(gradients: dict[str, torch.Tensor], layers: list[LayerShape]) -> torch.Tensor:
    """Concatenate per-layer gradients [B, o, i] into [B, sum(o*i)] in layer order."""
    return torch.cat([gradients[layer.name].flatten(1) for layer in layers], dim=1)
