"""A small self-supervised trainer (SimCLR, BYOL-lite, Barlow Twins) for demos, validation,
and `influence-ssl train` on a user's shards.

Not a general SSL library: enough to produce a real encoder on bundled data in minutes on a
CPU, so the demo and the validation measure influence on a model that learned something.
`run_train` streams the user's WebDataset shards through the project's reader (in this
process, or in one Ray task: pipeline/runtime/train_task.py; the GPU where there is one),
and writes a safetensors checkpoint, the loss curve and a job YAML for `fit` / `build` that
names the checkpoint, the arch and the augmentations.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import storage
from pipeline.augment import ViewGenerator
from pipeline.config import (
    AugmentConfig,
    InfluenceConfig,
    InputConfig,
    ModelConfig,
    PipelineConfig,
    RuntimeConfig,
)
from pipeline.errors import UserError
from pipeline.runtime.progress import Progress

log = logging.getLogger(__name__)

METHODS = ("simclr", "byol", "barlow")


@dataclass
class TrainConfig:
    """The SSL objective and its optimisation."""

    method: str = "simclr"  # "simclr", "byol" or "barlow"
    steps: int = 300  # optimiser steps (a cosine schedule over them)
    batch_size: int = 128  # examples per step (two views each)
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1e-5  # AdamW weight decay
    temperature: float = 0.2  # SimCLR
    ema: float = 0.99  # BYOL target momentum
    barlow_lambda: float = 5e-3  # Barlow Twins off-diagonal weight
    seed: int = 0  # seed of the initial weights, the batches and the views


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
    trainer = SSLTrainer(encoder, augment, config, images[:2])
    generator = torch.Generator().manual_seed(config.seed)
    losses, started = [], time.perf_counter()
    for step in range(config.steps):
        index = torch.randint(
            len(images), (min(config.batch_size, len(images)),), generator=generator
        )
        losses.append(trainer.step(images[index], [str(i) for i in index.tolist()], step))
        if step % max(1, config.steps // 5) == 0:
            log.info(
                "ssl step %d/%d loss %.4f (%.0fs)",
                step,
                config.steps,
                losses[-1],
                time.perf_counter() - started,
            )
    encoder.eval()
    return losses


class SSLTrainer:
    """One SSL run over `config.steps` steps: the encoder (trained in place), BYOL's predictor
    and EMA target, AdamW with a cosine schedule. `probe` (two images) sizes the predictor."""

    def __init__(
        self, encoder: nn.Module, augment: AugmentConfig, config: TrainConfig, probe: torch.Tensor
    ) -> None:
        if config.method not in METHODS:
            raise ValueError(f"unknown SSL method {config.method!r}; choose one of {METHODS}")
        torch.manual_seed(config.seed)
        self.encoder, self.augment, self.config = encoder, augment, config
        self.device = next(encoder.parameters()).device
        out_dim = encoder(probe[:2].to(self.device)).shape[1]
        byol = config.method == "byol"
        self.predictor = _predictor(out_dim).to(self.device) if byol else None
        self.target = copy.deepcopy(encoder).requires_grad_(False) if byol else None
        params = list(encoder.parameters())
        params += list(self.predictor.parameters()) if self.predictor else []
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.steps)
        encoder.train()

    def step(self, images: torch.Tensor, keys: list[str], step: int) -> float:
        """One optimiser step on two views of each image (views seeded by step and key)."""
        config = self.config
        views = ViewGenerator(self.augment, 2, seed=config.seed * 100_003 + step, seeding="key")(
            images.to(self.device), keys
        )
        loss = _step_loss(
            self.encoder, self.predictor, self.target, views[:, 0], views[:, 1], config
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        if self.target is not None:
            _ema_update(self.target, self.encoder, config.ema)
        return float(loss.detach())


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


# -- `influence-ssl train`: an encoder on the user's shards -------------------------------------


def _train_model() -> ModelConfig:
    return ModelConfig(
        arch="small_cnn", projector_dims=[128, 64], kwargs={"width": 32, "out_dim": 128}
    )


@dataclass
class TrainJobConfig:
    """`influence-ssl train`: an SSL encoder on your shards, and a job file for fit/build."""

    # Folder or s3:// prefix for the checkpoint, loss curve and job YAML (CLI --out).
    output: str = "runs/train"
    input: InputConfig = field(default_factory=InputConfig)  # your shards: input.shards
    model: ModelConfig = field(default_factory=_train_model)  # the encoder to train
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(size=32))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=64))
    index: str = ""  # where the job file's fit/build write the index ("": <output>/index)
    device: str = "auto"  # "auto" (a GPU where there is one), "cpu", "cuda", ...
    shuffle_buffer: int = 2000  # examples mixed across shards before batching
    cache_mb: int = 1024  # a corpus whose decoded images fit is read once, then kept in memory
    decode_threads: int = 2  # image-decoding threads of the shard reader
    progress: bool = True  # progress on stderr: a tqdm bar on terminals, else a line every 2 s
    # Train in one Ray task (on a GPU where the cluster has one) when true, or when
    # runtime.address or $RAY_ADDRESS (a Ray job) names a cluster; else in this process. The
    # shards must be readable there (s3://, or a shared file system); this process writes
    # the outputs.
    ray: bool = False
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def uses_ray(self) -> bool:
        return self.ray or bool(self.runtime.address or os.environ.get("RAY_ADDRESS"))


@dataclass
class Step:
    """One optimiser step done: its loss and the examples it trained on."""

    step: int
    loss: float
    examples: int


@dataclass
class Trained:
    """What a finished run hands to the writer (plain data: it travels back from Ray)."""

    state: dict[str, torch.Tensor]  # the encoder's weights, on the CPU
    losses: list[float]
    seen: int  # examples trained on
    seconds: float
    examples_per_pass: int  # 0 until a whole pass of the shards was read
    read: dict  # the first pass's read counts (ReadStats.to_dict())
    device: str
    where: str = "local"  # "local", or the Ray node that trained


def run_train(config: TrainJobConfig) -> dict[str, Any]:
    """Train, then write encoder.safetensors, loss.csv, loss.png, train.json and job.yaml."""
    shards = train_shards(config)
    if config.train.method not in METHODS:
        raise UserError(f"train.method {config.train.method!r} is unknown; use one of {METHODS}")
    if config.train.steps < 1 or config.train.batch_size < 2:
        raise UserError("train.steps must be >= 1 and train.batch_size >= 2")
    if config.uses_ray():
        from pipeline.runtime.train_task import train_on_ray

        trained = train_on_ray(config, shards, functools.partial(follow, config))
    else:
        trained = follow(config, training(config, shards))
    out = storage.open_storage(config.output)
    return write_outputs(out, config, trained)


def training(config: TrainJobConfig, shards: list[str]) -> Iterator[Step | Trained]:
    """The run as events: a Step after each optimiser step, then its Trained weights. The
    same loop here and in a Ray task (pipeline.runtime.train_task); no Ray in it."""
    device = torch.device(_device(config.device))
    torch.manual_seed(config.train.seed)  # the initial weights
    encoder = _encoder(config.model).to(device)
    side = config.input.side or config.augment.size
    stream = ShardStream(shards, side, config.model.in_channels, config)
    batches = batched(iter(stream), config.train.batch_size)
    batch = next(batches)
    started = time.perf_counter()
    trainer = SSLTrainer(encoder, config.augment, config.train, batch[0])
    losses: list[float] = []
    seen = 0
    for step in range(config.train.steps):
        losses.append(trainer.step(batch[0], batch[1], step))
        seen += len(batch[1])
        yield Step(step, losses[-1], len(batch[1]))
        if step + 1 < config.train.steps:
            batch = next(batches)
    encoder.eval()
    yield Trained(
        state={k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
        losses=losses,
        seen=seen,
        seconds=time.perf_counter() - started,
        examples_per_pass=stream.examples,
        read=stream.stats.to_dict() if stream.stats is not None else {},
        device=str(device),
    )


def follow(config: TrainJobConfig, events: Iterable[Step | Trained]) -> Trained:
    """Show a run's steps as they come (progress, loss, ETA on stderr); its Trained."""
    label = f"train {config.train.method}"
    with Progress(label, config.train.steps, "steps", enabled=config.progress) as progress:
        for event in events:
            if isinstance(event, Trained):
                return event
            progress.update(event.examples, note=f"loss {event.loss:.4f}")
    raise RuntimeError("the training run ended without its weights")


def train_shards(config: TrainJobConfig) -> list[str]:
    from pipeline.data import expand_shards

    if not config.input.shards:
        raise UserError("train needs shards: --set input.shards=PATH_OR_GLOB_OR_S3_PREFIX")
    try:
        return expand_shards(config.input.shards)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"input.shards: {exc}; give existing shards (paths, globs, s3://)") from exc


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _encoder(model: ModelConfig) -> nn.Module:
    from pipeline.models import build_encoder

    try:
        return build_encoder(model, open_uri=storage.read_uri)
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        raise UserError(f"model.arch={model.arch!r}: {str(exc).splitlines()[0]}") from exc


class ShardStream:
    """Samples of the shards, pass after pass: shard order reshuffled each pass, samples
    mixed in a shuffle buffer. A corpus whose decoded images fit `cache_mb` is read once and
    reshuffled from memory after that. The first pass's read statistics are kept."""

    def __init__(self, shards: list[str], side: int, channels: int, config: TrainJobConfig):
        self.shards, self.side, self.channels, self.config = shards, side, channels, config
        self.rng = random.Random(config.train.seed)
        self.examples = 0  # decodable examples in one pass
        self.passes = 0
        self.stats: Any = None
        self.cache: list[Any] | None = []  # the first pass's samples while they fit

    def __iter__(self) -> Iterator[Any]:
        while True:
            if self.passes and self.cache is not None:
                self.passes += 1
                yield from self.rng.sample(self.cache, len(self.cache))
            else:
                yield from self._read_pass()

    def _read_pass(self) -> Iterator[Any]:
        from pipeline.data import ReadStats, read_shard

        stats, count, pool = ReadStats(), 0, []
        budget = self.config.cache_mb * 2**20
        for url in self.rng.sample(self.shards, len(self.shards)):
            for sample in read_shard(
                url,
                self.side,
                self.channels,
                stats,
                self.config.input.max_pixels,
                self.config.decode_threads,
            ):
                count += 1
                self._remember(sample, count, budget)
                pool.append(sample)
                if len(pool) >= max(1, self.config.shuffle_buffer):
                    yield self._pop(pool)
        self.rng.shuffle(pool)
        self._end_pass(stats, count)
        yield from pool

    def _remember(self, sample: Any, count: int, budget: float) -> None:
        if self.passes > 0 or self.cache is None:
            return
        if count * sample.image.numel() * sample.image.element_size() > budget:
            self.cache = None  # too large to keep: every pass reads the shards
        else:
            self.cache.append(sample)

    def _pop(self, pool: list) -> Any:
        i = self.rng.randrange(len(pool))
        pool[i], pool[-1] = pool[-1], pool[i]
        return pool.pop()

    def _end_pass(self, stats: Any, count: int) -> None:
        if self.passes == 0:
            self.stats, self.examples = stats, count
            if count < 2:
                skipped = dict(sorted(stats.skipped.items())) or "none"
                raise UserError(
                    f"the shards hold {count} decodable example(s) (skipped: {skipped}); "
                    "SSL training needs at least 2"
                )
        self.passes += 1


def batched(samples: Iterator[Any], size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches of `size` samples; a batch closes early at a key it already holds (a corpus
    smaller than a batch), so no batch has an example twice."""
    batch: list[Any] = []
    keys: set[str] = set()
    for sample in samples:
        if sample.key in keys:
            if len(batch) < 2:
                continue  # one example alone cannot train (contrast, BatchNorm): drop the repeat
            yield _stack(batch)
            batch, keys = [], set()
        batch.append(sample)
        keys.add(sample.key)
        if len(batch) == size:
            yield _stack(batch)
            batch, keys = [], set()


def _stack(batch: list[Any]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([s.image for s in batch]), [s.key for s in batch]


def write_outputs(out, config: TrainJobConfig, trained: Trained) -> dict:
    from safetensors.torch import save

    from pipeline.jobfile import job_yaml

    losses, seen, seconds = trained.losses, trained.seen, trained.seconds
    out.write_bytes("encoder.safetensors", save(trained.state))
    out.write_bytes("loss.csv", loss_csv(losses).encode("utf-8"))
    out.write_bytes("loss.png", loss_png(losses, config.train.method))
    job = job_config(config, out)
    header = (
        f"Job for the {config.train.method} encoder `influence-ssl train` wrote.\n"
        f"Run: influence-ssl fit --config {out.url('job.yaml')}, then build --config (same)."
    )
    out.write_bytes("job.yaml", job_yaml(job, header).encode("utf-8"))
    summary = train_summary(config, out, trained)
    out.write_bytes("train.json", json.dumps(summary, indent=2).encode("utf-8"))
    print(
        f"train: {config.train.method}, {len(losses)} steps, {seen:,} examples seen "
        f"in {seconds:.0f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote "
        f"{summary['checkpoint']} and {summary['job']}",
        flush=True,
    )
    return summary


def job_config(config: TrainJobConfig, out) -> PipelineConfig:
    """The fit/build job of the trained encoder: its arch, checkpoint and augmentations, and
    the shards it trained on (local specs made absolute, so the file works from anywhere)."""
    model = copy.deepcopy(config.model)
    model.checkpoint = out.url("encoder.safetensors")
    specs = [
        s if "://" in s or os.path.isabs(s) else os.path.abspath(s) for s in config.input.shards
    ]
    return PipelineConfig(
        output=config.index or out.url("index"),
        input=InputConfig(shards=specs, side=config.input.side, max_pixels=config.input.max_pixels),
        influence=InfluenceConfig(model=model, augment=copy.deepcopy(config.augment)),
    )


def loss_csv(losses: list[float]) -> str:
    return "step,loss\n" + "".join(f"{i},{loss:.9g}\n" for i, loss in enumerate(losses))


def loss_png(losses: list[float], method: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(losses, lw=0.8, alpha=0.5, label="per step")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        axes.plot(range(window - 1, len(losses)), smooth, lw=1.5, label=f"mean of {window}")
    axes.set_xlabel("step")
    axes.set_ylabel(f"{method} loss")
    axes.legend(loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def train_summary(config: TrainJobConfig, out, trained: Trained) -> dict:
    stats, losses, seen = trained.read, trained.losses, trained.seen
    examples = trained.examples_per_pass or None
    return {
        "method": config.train.method,
        "steps": len(losses),
        "batch_size": config.train.batch_size,
        "examples_seen": seen,
        # Known once a whole pass was read (not when the steps end within the first pass).
        "examples_per_pass": examples,
        "epochs": round(seen / examples, 2) if examples else None,
        "seconds": round(trained.seconds, 2),
        "device": trained.device,
        "ran_on": trained.where,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "read": {"seen": stats.get("seen"), "skipped": stats.get("skipped")},
        "checkpoint": out.url("encoder.safetensors"),
        "loss_curve": out.url("loss.png"),
        "job": out.url("job.yaml"),
    }
