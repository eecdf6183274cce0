"""`Encoder`: a backbone, an optional projector, and which of the two outputs is `z`."""

from __future__ import annotations

import torch
from torch import nn

REPRESENTATIONS = ("backbone", "projector")


def resolve_representation(representation: str, has_projector: bool) -> str:
    """Map "auto" to "projector" when there is a projector, else "backbone"; check the rest."""
    if representation == "auto":
        return "projector" if has_projector else "backbone"
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"representation must be 'auto', 'backbone' or 'projector', not {representation!r}"
        )
    if representation == "projector" and not has_projector:
        raise ValueError(
            "representation='projector' but the encoder has no projector "
            "(set model.projector_dims, or use representation 'backbone' or 'auto')"
        )
    return representation


class Encoder(nn.Module):
    """Backbone plus optional projector; `forward` returns the chosen representation (B x d).

    The projector is kept even when `representation="backbone"` so a full checkpoint loads,
    but then it receives no gradient (see `active_module_prefixes`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module | None = None,
        representation: str = "auto",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.representation = resolve_representation(representation, projector is not None)
        self.load_report: object | None = None  # set by loading.load_weights

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output, whatever the representation."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        if self.representation == "projector":
            assert self.projector is not None  # guaranteed by resolve_representation
            z = self.projector(z)
        if z.ndim != 2:
            raise ValueError(
                f"encoder output has shape {tuple(z.shape)}; expected (batch, dim): "
                "the backbone must pool and flatten its features"
            )
        return z

    @property
    def out_dim(self) -> int:
        """Width of the representation returned by `forward`."""
        module = self.projector if self.representation == "projector" else self.backbone
        return int(module.out_dim)  # type: ignore[union-attr]

    def active_module_prefixes(self) -> list[str]:
        """Module-name prefixes (relative to this encoder) that get gradient from `forward`."""
        if self.representation == "projector":
            return ["backbone.", "projector."]
        return ["backbone."]
