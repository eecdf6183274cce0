"""Small real indexes for tests and benchmarks, built in memory (no Ray, no shards).

`write_index` embeds images with the in-memory engine and writes what `build` would: one
Parquet part per source shard, a marker, and `manifest.json` listing the parts, so
`pipeline.index.reader.Index` (and every offline verb) reads it like a built index.
`inject_duplicates` adds exact copies and augmented near-copies of real images, with the
truth groups needed to score deduplication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import (
    AugmentConfig,
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    PipelineConfig,
    ProjectionConfig,
)
from pipeline.data import pixel_hash
from pipeline.index.manifest import FORMAT, new_manifest, write_manifest
from pipeline.index.parts import part_table, publish_part
from pipeline.influence.engine import InfluenceSSL
from pipeline.models import build_encoder, model_identity
from pipeline.storage import open_storage


def small_config(num_views: int = 8) -> InfluenceConfig:
    """A small SSL-ish encoder on 28x28 grayscale digits (dense projected Fisher)."""
    return InfluenceConfig(
        model=ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[16, 8],
            kwargs={"width": 4, "out_dim": 16},
        ),
        augment=AugmentConfig(
            size=28, crop_scale=(0.6, 1.0), flip_p=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0
        ),
        loss=LossConfig(num_views=num_views),
        projection=ProjectionConfig(dim_in=8, dim_out=4),
        batch_size=64,
        device="cpu",
    )


def small_engine(images: torch.Tensor, config: InfluenceConfig | None = None) -> InfluenceSSL:
    """An untrained (seeded) encoder with curvature fitted on `images`."""
    config = config or small_config()
    torch.manual_seed(0)
    return InfluenceSSL(build_encoder(config.model), config).fit(images)


def image_hashes(images: torch.Tensor) -> list[str]:
    """The decoded-pixel hash each image gets from a PNG shard (uint8 grayscale, mode "L")."""
    pixels = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [pixel_hash(Image.fromarray(p)) for p in pixels]


def write_index(
    folder: str,
    images: torch.Tensor,
    keys: Sequence[str],
    cls: Sequence[int | None] | None = None,
    metadata: Sequence[dict] | None = None,
    shards: int | Sequence[str] = 2,
    engine: InfluenceSSL | None = None,
    vector_dtype: str = "float32",
    columns: Sequence[str] | None = None,
    per_shard: int | None = None,
) -> str:
    """Embed `images` [N, 1, H, W] and write an index under `folder`; returns its URI.

    `shards`: how many parts to split the rows into (contiguously), or the source shard URLs
    (one part each); rows are split evenly, or `per_shard` rows a part in order like
    `pipeline.data.write_shards`. `engine` defaults to `small_engine(images)`. `columns`:
    keep only these (an index from an older build, say, without pixel_hash or z).
    """
    n = len(images)
    engine = engine or small_engine(images)
    cls = list(cls) if cls is not None else [None] * n
    metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
    urls = (
        [f"mem://shard-{i:06d}.tar" for i in range(shards)] if isinstance(shards, int) else shards
    )
    w, loss, z = embed_rows(engine, images, list(keys))
    hashes = image_hashes(images)
    storage = open_storage(folder)
    config = PipelineConfig(output=folder, influence=engine.config)
    layers = [layer.describe() for layer in engine.tracker.layers]
    manifest = new_manifest(
        config, model_identity(engine.encoder, engine.config.model), layers, engine.dimension
    )
    if per_shard:
        splits = [np.arange(n)[i : i + per_shard] for i in range(0, n, per_shard)]
    else:
        splits = np.array_split(np.arange(n), len(urls))
    for shard, rows in zip(urls, splits, strict=True):
        table = part_table(
            [keys[i] for i in rows],
            shard,
            w[rows],
            (w[rows].astype(np.float64) ** 2).sum(1),
            loss[rows],
            [cls[i] for i in rows],
            [metadata[i] for i in rows],
            vector_dtype,
            pixel_hashes=[hashes[i] for i in rows],
            z=z[rows],
        )
        table = table.select(list(columns)) if columns is not None else table
        shard_id = shard.rsplit("/", 1)[-1].removesuffix(".tar")
        marker = publish_part(storage, shard_id, table, {"shard": shard, "shard_id": shard_id})
        manifest["shards"].append(
            {"url": shard, "id": shard_id, "examples": len(rows), "part": marker["part"]}
        )
    write_manifest(storage, manifest)
    return storage.uri


def embed_rows(
    engine: InfluenceSSL, images: torch.Tensor, keys: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, D], loss [N] and the unit representation z [N, d] of every image."""
    ws, losses, zs = [], [], []
    step = engine.config.batch_size
    for start in range(0, len(images), step):
        batch, batch_keys = images[start : start + step], keys[start : start + step]
        w, loss = engine.embed_batch_with_loss(batch, batch_keys)
        ws.append(w.float().cpu())
        losses.append(loss.float().cpu())
        zs.append(engine.represent(batch).cpu())
    return torch.cat(ws).numpy(), torch.cat(losses).numpy(), torch.cat(zs).numpy()


# -- injected duplicates ----------------------------------------------------------------------


@dataclass
class Corpus:
    """Images with keys, labels, and the injected duplicates' truth groups (lists of keys)."""

    images: torch.Tensor
    keys: list[str]
    cls: list[int]
    exact: list[list[str]] = field(default_factory=list)  # [original, exact copy]
    near: list[list[str]] = field(default_factory=list)  # [original, near copy]

    @property
    def truth(self) -> list[list[str]]:
        return self.exact + self.near


def near_copy(image: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """A slightly edited copy of one [1, H, W] image: shift, brightness, or crop-and-resize.

    `strength` in (0, 1] scales the edit: a shift of up to 2*strength pixels, a brightness
    factor 1 -/+ 0.3*strength, or a crop losing up to 4*strength pixels per side.
    """
    kind = rng.integers(3)
    if kind == 0:
        reach = max(1, round(2 * strength))
        dy, dx = rng.integers(-reach, reach + 1, size=2)
        dx = dx if (dy, dx) != (0, 0) else reach
        return torch.roll(image, shifts=(int(dy), int(dx)), dims=(1, 2))
    if kind == 1:
        factor = 1 + rng.choice([-1, 1]) * 0.3 * strength
        return (image * factor).clamp(0, 1)
    cut = max(1, round(4 * strength * rng.uniform(0.5, 1.0)))
    side = image.shape[-1]
    crop = image[:, cut : side - cut, cut : side - cut][None]
    return F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True)[0].clamp(0, 1)


def inject_duplicates(
    images: torch.Tensor,
    cls: Sequence[int],
    exact: int,
    near: int,
    strengths: Sequence[float] = (0.5,),
    seed: int = 0,
) -> Corpus:
    """`images` plus `exact` pixel-identical copies and `near` near-copies of distinct images.

    Copies are appended after the originals (so the original's key sorts first) and quantised
    to 8 bits like an image read back from a PNG shard; near-copies cycle through `strengths`.
    """
    rng = np.random.default_rng(seed)
    base = (images * 255).round() / 255
    picks = rng.choice(len(images), size=exact + near, replace=False)
    keys = [f"img-{i:06d}" for i in range(len(images))]
    extra, extra_keys, extra_cls = [], [], []
    corpus = Corpus(base, keys, [int(v) for v in cls])
    for j, i in enumerate(picks):
        if j < exact:
            copy, group = base[i], corpus.exact
        else:
            copy = near_copy(base[i], strengths[(j - exact) % len(strengths)], rng)
            copy, group = (copy * 255).round() / 255, corpus.near
        key = f"zcopy-{j:06d}"
        group.append([keys[i], key])
        extra.append(copy)
        extra_keys.append(key)
        extra_cls.append(int(cls[i]))
    if extra:
        corpus.images = torch.cat([base, torch.stack(extra)])
    corpus.keys += extra_keys
    corpus.cls += extra_cls
    return corpus


# -- synthetic indexes at scale -----------------------------------------------------------------


def write_synthetic_index(
    uri: str,
    parts: int,
    rows: int,
    dimension: int,
    seed: int = 0,
    vector_dtype: str = "float32",
    z_dim: int = 128,
) -> str:
    """An index of `parts` x `rows` random rows written by the real part writer (every column
    `build` writes: w [D], z, pixel hash, tar spans), with a manifest `Index` accepts. No model:
    for storage and read-path tests and benchmarks at sizes an engine could not embed."""
    rng = np.random.default_rng(seed)
    storage = open_storage(uri)
    shards = []
    for number in range(parts):
        w = rng.standard_normal((rows, dimension), dtype=np.float32)
        url = f"s3://source/shard-{number:06d}.tar"
        table = part_table(
            [f"p{number:06d}-{row:07d}" for row in range(rows)],
            url,
            w,
            (w.astype(np.float64) ** 2).sum(1),
            rng.uniform(0.0, 2.0, rows).astype(np.float32),
            rng.integers(0, 10, rows).tolist(),
            [{"split": "train"}] * rows,
            vector_dtype,
            pixel_hashes=[f"{h:032x}" for h in rng.integers(0, 2**63, rows)],
            z=rng.standard_normal((rows, z_dim), dtype=np.float32),
            tar_spans=(list(range(0, 1024 * rows, 1024)), [1024] * rows),
        )
        shard_id = f"shard-{number:06d}"
        marker = publish_part(storage, shard_id, table, {"shard": url, "shard_id": shard_id})
        shards.append({"url": url, "id": shard_id, "examples": rows, "part": marker["part"]})
    manifest = {"format": FORMAT, "dimension": dimension, "vector_dtype": vector_dtype}
    write_manifest(storage, {**manifest, "shards": shards})
    return storage.uri
