"""A small self-supervised trainer (SimCLR, BYOL-lite, Barlow Twins) for demos and validation.

Not a general SSL library: enough to produce a real encoder on bundled data in minutes on a
CPU, so the demo and the validation measure influence on a model that learned something.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import ViewGenerator
from pipeline.config import AugmentConfig

log = logging.getLogger(__name__)

METHODS = ("simclr", "byol", "barlow")


@dataclass
class TrainConfig:
    method: str = "simclr"
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-5
    temperature: float = 0.2  # SimCLR
    ema: float = 0.99  # BYOL target momentum
    barlow_lambda: float = 5e-3  # Barlow Twins off-diagonal weight
    seed: int = 0


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2B views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """Cross-correlation of standardised embeddings pushed to the identity."""
    z1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-5)
    z2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-5)
    c = z1.T @ z2 / len(z1)
    diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    rest = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return diagonal + off_diagonal * rest


def byol_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, target.detach(), dim=1)).mean()


def train_ssl(
    encoder: nn.Module,
    images: torch.Tensor,
    augment: AugmentConfig,
    config: TrainConfig | None = None,
) -> list[float]:
    """Train `encoder` (its forward gives the representation) in place; returns the losses.

    Views come from the same deterministic ViewGenerator as influence, with a fresh seed per
    step so training sees new views every time. Leaves the encoder in eval mode.
    """
    config = config or TrainConfig()
    if config.method not in METHODS:
        raise ValueError(f"unknown SSL method {config.method!r}; choose one of {METHODS}")
    torch.manual_seed(config.seed)
    device = next(encoder.parameters()).device
    out_dim = encoder(images[:2].to(device)).shape[1]
    predictor = _predictor(out_dim).to(device) if config.method == "byol" else None
    target = copy.deepcopy(encoder).requires_grad_(False) if config.method == "byol" else None
    params = list(encoder.parameters()) + (list(predictor.parameters()) if predictor else [])
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    losses, started = [], time.perf_counter()
    encoder.train()
    for step in range(config.steps):
        index = torch.randint(
            len(images), (min(config.batch_size, len(images)),), generator=generator
        )
        views = ViewGenerator(augment, 2, seed=config.seed * 100_003 + step, seeding="key")(
            images[index].to(device), [str(i) for i in index.tolist()]
        )
        loss = _step_loss(encoder, predictor, target, views[:, 0], views[:, 1], config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if target is not None:
            _ema_update(target, encoder, config.ema)
        losses.append(float(loss.detach()))
        if step % max(1, config.steps // 5) == 0:
            log.info(
                "ssl step %d/%d loss %.4f (%.0fs)",
                step,
                config.steps,
                loss,
                time.perf_counter() - started,
            )
    encoder.eval()
    return losses


def _predictor(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))


def _step_loss(encoder, predictor, target, x1, x2, config: TrainConfig) -> torch.Tensor:
    z1, z2 = encoder(x1), encoder(x2)
    if config.method == "simclr":
        return nt_xent(z1, z2, config.temperature)
    if config.method == "barlow":
        return barlow_twins(z1, z2, config.barlow_lambda)
    with torch.no_grad():
        t1, t2 = target(x1), target(x2)
    return byol_loss(predictor(z1), t2) + byol_loss(predictor(z2), t1)


@torch.no_grad()
def _ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)
