"""The in-memory engine: views -> loss -> hooked backward -> projected gradients -> w(x).

Independent of Ray and of storage. The distributed pipeline calls the same three steps a
worker needs (`accumulate` a pass into partial statistics, `complete_pass` on the merged
statistics, `embed` batches); a notebook calls `fit` and `embed` on tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from pipeline.augment import ViewGenerator, normalise_views
from pipeline.config import InfluenceConfig, to_dict
from pipeline.influence.curvature import LayerShape, ProjectedBatch, make_curvature
from pipeline.influence.loss import consistency_loss
from pipeline.influence.statistics import Statistics
from pipeline.influence.tracker import GradientTracker

FACTORS_FORMAT = "influence-ssl/factors/1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No weight gradients during the hooked backward: only layer-output gradients are used.

    With the graph starting at the first tracked layer's output (see the tracker's forward
    hook), the backward computes neither weight gradients nor anything before that layer.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def batches(
    images: torch.Tensor, keys: Sequence[str], batch_size: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], list(keys[start : start + batch_size])


def default_keys(n: int) -> list[str]:
    return [f"{i:08d}" for i in range(n)]


class InfluenceSSL:
    """Label-free influence for one encoder under one configuration.

    >>> engine = InfluenceSSL(encoder, config).fit(train_images)
    >>> w_train = engine.embed(train_images)
    >>> w_query = engine.embed(query_images, keys=["q0", "q1"])
    >>> scores = influence(w_query, w_train)           # [Q, N], pipeline.influence.scoring
    """

    def __init__(self, encoder: nn.Module, config: InfluenceConfig | None = None) -> None:
        self.config = config or InfluenceConfig()
        self.device = resolve_device(self.config.device)
        self.encoder = encoder.to(self.device).eval()
        self.tracker = GradientTracker(self.encoder, self.config.layers, self.config.projection)
        self.views = self.view_generator()
        shapes = [LayerShape(l.name, l.dim_in, l.dim_out) for l in self.tracker.layers]
        self.curvature = make_curvature(shapes, self.config.curvature)

    def view_generator(
        self, num_views: int | None = None, offset: int = 0, seeding: str | None = None
    ) -> ViewGenerator:
        """Views of the index's stream; `seeding` overrides the config's (then stratified
        views are one Latin-hypercube block of `num_views`, not blocks of the index's V)."""
        loss = self.config.loss
        return ViewGenerator(
            self.config.augment,
            num_views or loss.num_views,
            loss.seed,
            seeding or loss.view_seeding,
            offset,
            block=num_views if seeding else loss.num_views,
        )

    def use_views(
        self, num_views: int | None = None, offset: int = 0, seeding: str | None = None
    ) -> InfluenceSSL:
        """Embed with views `offset .. offset + num_views - 1` of the same stream from now on.

        More views estimate the same expected loss with less noise (a query's w); `offset=V`
        gives a second set independent of the index's (the reliability check). The factors
        are unchanged. `seeding="stratified"` draws the views as one Latin-hypercube block
        (refinement: many views, where stratifying pays).
        """
        self.views = self.view_generator(num_views, offset, seeding)
        return self

    def examples_per_batch(self) -> int:
        """`batch_size`, or as many examples as fill `views_per_batch` with the views in use."""
        if self.config.batch_size > 0:
            return self.config.batch_size
        return max(1, self.config.views_per_batch // self.views.num_views)

    # -- one batch -------------------------------------------------------------------------

    def make_views(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """[B, V, C, s, s] deterministic views of each example."""
        if len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        return self.views(images.to(self.device, torch.float32), list(keys))

    def project_views(self, views: torch.Tensor) -> tuple[ProjectedBatch, torch.Tensor]:
        """Projected rows of every tracked layer, and the per-example losses [B]."""
        self.encoder.eval()
        num_examples, num_views = views.shape[:2]
        frozen = frozen_parameters(self.encoder)
        with frozen, self.tracker.capture() as capture, torch.enable_grad():
            with self.autocast():
                z = self.encoder(views.flatten(0, 1).detach())
            z = z.float().reshape(num_examples, num_views, -1)
            losses = consistency_loss(z, self.config.loss.kind, self.config.loss.estimator)
            losses.sum().backward()
        return ProjectedBatch(rows=capture.rows(num_examples)), losses.detach()

    def autocast(self) -> torch.autocast:
        if self.config.autocast not in ("none", "bf16"):
            raise ValueError(f"autocast must be 'none' or 'bf16', not {self.config.autocast!r}")
        enabled = self.config.autocast == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def project(self, images: torch.Tensor, keys: Sequence[str]) -> ProjectedBatch:
        return self.project_views(self.make_views(images, keys))[0]

    # -- fitting ---------------------------------------------------------------------------

    def accumulate(
        self,
        pass_name: str,
        images: torch.Tensor,
        keys: Sequence[str] | None = None,
        stats: Statistics | None = None,
    ) -> Statistics:
        """Partial statistics of one curvature pass over `images` (mergeable across workers)."""
        stats = stats if stats is not None else Statistics()
        keys = keys if keys is not None else default_keys(len(images))
        for batch_images, batch_keys in batches(images, keys, self.examples_per_batch()):
            self.curvature.accumulate(pass_name, stats, self.project(batch_images, batch_keys))
        return stats

    def complete_pass(self, pass_name: str, stats: Statistics) -> None:
        self.curvature.complete_pass(pass_name, stats)

    def fit(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> InfluenceSSL:
        """Run every curvature pass over `images` in memory."""
        while (pass_name := self.curvature.next_pass()) is not None:
            self.complete_pass(pass_name, self.accumulate(pass_name, images, keys))
        return self

    # -- embedding -------------------------------------------------------------------------

    def embed_batch(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        return self.embed_batch_with_loss(images, keys)[0]

    def embed_batch_with_loss(
        self, images: torch.Tensor, keys: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """w(x) [B, D] and the consistency loss l(x) [B] of one batch."""
        batch, losses = self.project_views(self.make_views(images, keys))
        return self.curvature.whiten(batch.gradients()), losses

    def embed(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """w(x) for every image, [N, D] float32 on the CPU."""
        keys = keys if keys is not None else default_keys(len(images))
        parts = [
            self.embed_batch(batch_images, batch_keys).float().cpu()
            for batch_images, batch_keys in batches(images, keys, self.examples_per_batch())
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.curvature.dimension)

    def fit_embed(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """`fit(images)` then `embed(images)`, the same w. Where the curvature is fitted in
        one pass over per-example gradients (dense), that pass keeps them ([N, D] on the
        CPU) and whitens them once fitted: one backward pass per example instead of two."""
        keys = keys if keys is not None else default_keys(len(images))
        pass_name = self.curvature.next_pass()
        last = bool(self.curvature.passes) and pass_name == self.curvature.passes[-1]
        if not (self.curvature.gradients_only and last):
            return self.fit(images, keys).embed(images, keys)
        stats, kept = Statistics(), []
        for batch_images, batch_keys in batches(images, keys, self.examples_per_batch()):
            batch = self.project(batch_images, batch_keys)
            self.curvature.accumulate(pass_name, stats, batch)
            kept.append({name: g.cpu() for name, g in batch.gradients().items()})
        self.complete_pass(pass_name, stats)
        parts = [self.curvature.whiten(gradients).float().cpu() for gradients in kept]
        return torch.cat(parts) if parts else torch.empty(0, self.curvature.dimension)

    @torch.no_grad()
    def represent(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm representation z(x) [B, out_dim] of the un-augmented images.

        The embedding baseline (SemDeDup-style deduplication, cosine retrieval) compares
        these; the images are resized to the view size and normalised like the views.
        """
        x = images.to(self.device, torch.float32)
        size = self.config.augment.size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        x = normalise_views(x, self.config.augment)
        self.encoder.eval()
        with self.autocast():
            z = self.encoder(x)
        return torch.nn.functional.normalize(z.float().flatten(1), dim=1)

    @property
    def dimension(self) -> int:
        return self.curvature.dimension

    # -- factors as safetensors bytes (no pickle) ---------------------------------------------

    def factors_metadata(self) -> dict[str, str]:
        return {
            "format": FACTORS_FORMAT,
            "curvature": self.curvature.kind,
            "completed": json.dumps(self.curvature.completed),
            "layers": json.dumps([layer.describe() for layer in self.tracker.layers]),
            "projection": json.dumps(to_dict(self.config.projection)),
        }

    def factors_bytes(self) -> bytes:
        tensors = {k: v.contiguous().cpu() for k, v in self.curvature.state_dict().items()}
        return safetensors.torch.save(tensors, metadata=self.factors_metadata())

    def load_factors_bytes(self, data: bytes, source: str = "factors") -> InfluenceSSL:
        metadata = safetensors_metadata(data)
        if metadata.get("format") != FACTORS_FORMAT:
            raise ValueError(f"{source} is not an influence-ssl factors file")
        ours = self.factors_metadata()
        mismatched = [
            field
            for field in ("curvature", "layers", "projection")
            if metadata.get(field) != ours[field]
        ]
        if mismatched:
            raise ValueError(
                f"factors in {source} were fitted with other {', '.join(mismatched)} than this "
                f"engine (curvature {self.curvature.kind!r})"
            )
        self.curvature.load_state_dict(
            safetensors.torch.load(data), json.loads(metadata["completed"])
        )
        return self

    def save_factors(self, path: str | Path) -> None:
        Path(path).write_bytes(self.factors_bytes())

    def load_factors(self, path: str | Path) -> InfluenceSSL:
        return self.load_factors_bytes(Path(path).read_bytes(), str(path))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (an 8-byte length, then a JSON header)."""
    if len(data) < 8:
        raise ValueError("not a safetensors blob: too short")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError("not a safetensors blob: header length out of range")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})
