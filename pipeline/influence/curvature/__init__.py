"""Curvature options behind one contract (see `base.Curvature`)."""

from __future__ import annotations

from pipeline.config import CurvatureConfig
from pipeline.influence.curvature.base import Curvature, LayerShape, ProjectedBatch
from pipeline.influence.curvature.dense import DenseCurvature
from pipeline.influence.curvature.ekfac import EkfacCurvature
from pipeline.influence.curvature.identity import IdentityCurvature

CURVATURE_KINDS = ("ekfac", "dense", "dense_all", "identity")


def make_curvature(layers: list[LayerShape], config: CurvatureConfig) -> Curvature:
    """The curvature named by `config.kind`, unfitted."""
    if config.kind == "ekfac":
        return EkfacCurvature(layers, config)
    if config.kind in ("dense", "dense_all"):
        return DenseCurvature(layers, config, across_layers=config.kind == "dense_all")
    if config.kind == "identity":
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
]
