"""Refinement: a few examples' w re-computed with many more views, where precision matters.

The index's w uses V views; a query's top candidates or dedup's candidate pairs are few, so
they can afford far more. Their images are read back from their source shards by key (the
index stores no pixels), decoded as `build` decoded them, and embedded with the manifest's
model, projection and factors under `views` views (views 0..V-1 are the index's own, the rest
continue the same stream), which estimates the same w with less noise. Where the parts record
each example's byte span in its shard, an example costs one ranged read, not a shard scan.
An example whose shard or image can no longer be read keeps its stored w and is reported as
not refined.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch

from pipeline.data import ImageError, decode_image
from pipeline.data.lookup import SPAN_COLUMNS, Span, scan_shard, spans_by_shard
from pipeline.index.reader import Index

log = logging.getLogger(__name__)


class Refiner:
    def __init__(self, index: Index, views: int, device: str = "cpu", model=None, projection=None):
        from pipeline.query import engine_for  # the same engine (and checks) as image queries

        if views < 2:
            raise ValueError(f"refine needs >= 2 views, got {views}")
        self.index = index
        self.engine, config = engine_for(index, model, projection, device)
        self.engine.use_views(views)
        self.views = views
        self.side = config.input.side or config.influence.augment.size
        self.channels = config.influence.model.in_channels
        self.max_pixels = config.input.max_pixels
        self.spanned = set(SPAN_COLUMNS) <= index.columns()  # older indices: scan shards
        self.cache: dict[int, np.ndarray | None] = {}

    def embed_images(self, images: torch.Tensor, names: list[str]) -> np.ndarray:
        return self.engine.embed(images, keys=names).numpy()

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refined w [n, D] of global `rows` and whether each could be refined; rows that
        could not keep their stored w."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._fill([int(r) for r in np.unique(rows) if int(r) not in self.cache])
        stored = self.index.vectors(self.index.take(rows, ["w"]))
        refined = np.array([self.cache[int(r)] is not None for r in rows], dtype=bool)
        out = stored.copy()
        for i in np.flatnonzero(refined):
            out[i] = self.cache[int(rows[i])]
        return out, refined

    def _fill(self, rows: list[int]) -> None:
        if not rows:
            return
        table = self._locate(np.array(rows, dtype=np.int64))
        spans = spans_by_shard(table)
        wanted: dict[str, dict[str, int]] = defaultdict(dict)
        for row, key, shard in zip(
            rows, table.column("key").to_pylist(), table.column("shard").to_pylist(), strict=True
        ):
            wanted[shard][key] = row
            self.cache[row] = None
        for shard, by_key in wanted.items():  # one shard's images in memory at a time
            found = self._read(shard, list(by_key), spans.get(shard))
            if found:
                w = self.embed_images(torch.stack(list(found.values())), list(found))
                for key, vector in zip(found, w, strict=True):
                    self.cache[by_key[key]] = vector
        missing = sum(self.cache[r] is None for r in rows)
        if missing:
            log.warning("refine: %d of %d examples could not be read back", missing, len(rows))

    def _locate(self, rows: np.ndarray) -> pa.Table:
        """key and shard of the rows, with their byte spans where the parts have them."""
        if self.spanned:
            try:
                return self.index.take(rows, ["key", "shard", *SPAN_COLUMNS])
            except (pa.ArrowInvalid, KeyError):  # a part written before spans were recorded
                pass
        return self.index.take(rows, ["key", "shard"])

    def _read(
        self, shard: str, keys: list[str], spans: dict[str, Span] | None = None
    ) -> dict[str, torch.Tensor]:
        try:
            found = scan_shard(shard, keys, self.max_pixels, spans).images
        except OSError as error:
            log.warning("refine: cannot read %s: %s", shard, error)
            return {}
        out = {}
        for key, data in found.items():
            try:
                out[key] = decode_image(data, self.side, self.channels, self.max_pixels)
            except ImageError:
                continue
        return out


def rerank(
    queries: np.ndarray,
    candidates: np.ndarray,
    vectors: np.ndarray,
    top: int,
    normalized: bool,
    opponents: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each query's candidate rows [Q, C] by refined scores; `vectors` [Q, C, D] are
    the candidates' refined w. Returns (scores, rows), both [Q, top], best first."""
    scores = np.einsum("qd,qcd->qc", queries, vectors)
    if normalized:
        norms = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(vectors, axis=2)
        scores = scores / np.maximum(norms, 1e-30)
    scores = np.where(candidates >= 0, scores, np.inf if opponents else -np.inf)
    order = np.argsort(scores if opponents else -scores, axis=1, kind="stable")[:, :top]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)
