"""Curvature options behind one contract (see `base.Curvature`)."""

from __future__ import annotations

from pipeline.config import CurvatureConfig
from pipeline.influence.curvature.base import Curvature, LayerShape, ProjectedBatch
from pipeline.influence.curvature.dense import DenseCurvature
from pipeline.influence.curvature.ekfac import EkfacCurvature
from pipeline.influence.curvature.identity import IdentityCurvature

CURVATURE_KINDS = ("auto", "ekfac", "dense", "dense_all", "identity")


def resolve_kind(layers: list[LayerShape], config: CurvatureConfig) -> str:
    """ "auto": the dense Fisher across all layers where it fits, else per layer.

    On the fidelity benchmark (benchmarks/results/fidelity.md) dense_all beats per-layer
    dense, which beats EK-FAC, at every projection size.
    """
    if config.kind != "auto":
        return config.kind
    total = sum(layer.size for layer in layers)
    return "dense_all" if total <= config.max_dense_dim else "dense"


def make_curvature(layers: list[LayerShape], config: CurvatureConfig) -> Curvature:
    """The curvature named by `config.kind` (with "auto" resolved), unfitted."""
    kind = resolve_kind(layers, config)
    if kind == "ekfac":
        return EkfacCurvature(layers, config)
    if kind in ("dense", "dense_all"):
        return DenseCurvature(layers, config, across_layers=kind == "dense_all")
    if kind == "identity":
        return IdentityCurvature(layers, config)
    raise ValueError(f"unknown curvature kind {config.kind!r}; choose one of {CURVATURE_KINDS}")


__all__ = [
    "CURVATURE_KINDS",
    "Curvature",
    "DenseCurvature",
    "EkfacCurvature",
    "IdentityCurvature",
    "LayerShape",
    "ProjectedBatch",
    "make_curvature",
    "resolve_kind",
]
