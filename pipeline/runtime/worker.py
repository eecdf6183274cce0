"""The work done on one shard, free of Ray: a Ray actor wraps this class, a test calls it.

A worker loads the model, the projection and (for `build`) the factors once, then handles
shards one after another: streaming the tar in a background thread, decoding on a pool of
`runtime.decode_threads` so the model never waits on a single decoder, batching, and either
accumulating curvature statistics (`accumulate`) or writing the shard's index part and
marker (`build_shard`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import ModelConfig, PipelineConfig, from_dict
from pipeline.data import ReadStats, read_shard, shard_id
from pipeline.index.layout import FACTORS, retry_path
from pipeline.index.parts import part_table, publish_part
from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.reliability import measure as measure_reliability
from pipeline.influence.statistics import Statistics
from pipeline.models import Encoder, build_encoder
from pipeline.runtime.reduce import Node, TreeSum
from pipeline.storage import open_storage, read_uri

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor
    keys: list[str]
    cls: list[int | None] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    pixel_hashes: list[str] = field(default_factory=list)
    tar_offsets: list[int | None] = field(default_factory=list)
    tar_sizes: list[int | None] = field(default_factory=list)


def build_model(model: ModelConfig) -> Encoder:
    """The encoder, initialised from a fixed seed before its checkpoint loads.

    Every process must hold the same weights; a model without a checkpoint (tests, random
    baselines) would otherwise differ from worker to worker.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_encoder(model, open_uri=read_uri)


def decode_side(config: PipelineConfig) -> int:
    return config.input.side or config.influence.augment.size


class ShardWorker:
    def __init__(self, config: dict) -> None:
        self.config: PipelineConfig = from_dict(PipelineConfig, config)
        threads = max(1, int(self.config.runtime.cpus_per_worker))
        torch.set_num_threads(threads)
        model = self.config.influence.model
        self.engine = InfluenceSSL(build_model(model), self.config.influence)
        self.output = open_storage(self.config.output)
        self.channels = model.in_channels
        self.store_z = self.config.index.store_representation
        # One shard computes at a time; a second queued shard decodes meanwhile.
        self.compute = threading.Lock()
        self.node: str | None = None  # the cluster node, where the runtime knows it

    # -- state shipped from the driver ------------------------------------------------------

    def load_curvature(self, state: dict[str, torch.Tensor], completed: list[str]) -> None:
        self.engine.curvature.load_state_dict(state, completed)
        self.engine.curvature.to(self.engine.device)

    def load_factors(self, data: bytes | None = None) -> None:
        """The fitted factors: given (put into the object store once by the driver), or
        read from the output URI (written by `fit`)."""
        data = self.output.read_bytes(FACTORS) if data is None else data
        self.engine.load_factors_bytes(data, self.output.url(FACTORS))
        self.engine.curvature.to(self.engine.device)

    # -- per shard ----------------------------------------------------------------------------

    def accumulate_block(
        self, pass_name: str, urls: list[str], block: tuple[int, int], leaves: int
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """Partial statistics of one pass over an aligned block of consecutive shards,
        summed in the pass's fixed tree order (pipeline.runtime.reduce), returned once.

        Returns (counts, statistics): the driver fetches the counts and leaves the
        statistics in the object store for the next merge.
        """
        tree = TreeSum(Node(*block), leaves, lambda left, right: left.merge(right))
        read, examples = ReadStats(), 0
        for url in urls:
            stats, count = self.accumulate(pass_name, url, read)
            tree.add(stats)
            examples += count
        counts = {
            "examples": examples,
            "read": read.to_dict(),
            "shards": len(urls),
            "node": self.node,
        }
        return counts, tree.result().to_tensors()

    def merge(
        self, left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """left + right, one step up the reduce tree (runs beside shard work: no lock)."""
        total = Statistics.from_tensors(left).merge(Statistics.from_tensors(right))
        return {}, total.to_tensors()

    def accumulate(self, pass_name: str, url: str, read: ReadStats) -> tuple[Statistics, int]:
        """Partial statistics of one curvature pass over one shard."""
        stats, examples = Statistics(), 0
        shard_read = ReadStats()
        samples = self.open_shard(url, shard_read)
        try:
            with self.compute:
                for batch in self.batches(samples, self.config.fit.max_examples_per_shard):
                    projected = self.engine.project(batch.images, batch.keys)
                    self.engine.curvature.accumulate(pass_name, stats, projected)
                    examples += len(batch.keys)
        finally:
            samples.close()  # also on failure: no reader thread left behind for a retry
        check_stream(url, shard_read)
        read += shard_read
        return stats, examples

    def reliability(self, urls: list[str], sample: int) -> dict:
        """Reliability of w (pipeline.influence.reliability) on the first `sample` examples
        of `urls`: embedded with the index's views 0..V-1 and with the independent V..2V-1."""
        images, keys = [], []
        for url in urls:
            samples = self.open_shard(url, ReadStats())
            try:
                for batch in self.batches(samples, sample - len(keys)):
                    images.append(batch.images)
                    keys += batch.keys
            finally:
                samples.close()
            if len(keys) >= sample:
                break
        if len(keys) < 2:
            raise ValueError(f"reliability needs >= 2 readable examples, found {len(keys)}")
        x = torch.cat(images)
        views = self.engine.config.loss.num_views
        with self.compute:
            try:
                w_a = self.engine.use_views(views, 0).embed(x, keys)
                w_b = self.engine.use_views(views, views).embed(x, keys)
            finally:
                self.engine.use_views(views, 0)
        return measure_reliability(w_a, w_b, views)

    def embed_images(self, uris: list[str], views: int) -> np.ndarray:
        """w [len(uris), D] of query images with `views` views (`query` over many images:
        the same function as in-process queries)."""
        from pipeline.query import embed_image_files  # query code, imported where used

        with self.compute:
            try:
                return embed_image_files(self.engine, self.config, uris, views)
            finally:
                self.engine.use_views(self.config.influence.loss.num_views, 0)

    def build_shard(self, url: str) -> dict:
        """Embed every example of a shard; publish its part, then its marker."""
        read = ReadStats()
        samples = self.open_shard(url, read)
        rows = Rows()
        try:
            with self.compute:
                started = time.perf_counter()
                for batch in self.batches(samples):
                    w, loss = self.engine.embed_batch_with_loss(batch.images, batch.keys)
                    z = self.engine.represent(batch.images) if self.store_z else None
                    rows.add(batch, w.float().cpu(), loss.float().cpu(), z)
                seconds = time.perf_counter() - started
        finally:
            samples.close()
        check_stream(url, read)
        z_dim = self.engine.encoder.out_dim if self.store_z else None
        settings = self.config.index
        dimension = self.engine.dimension
        table = rows.table(url, dimension, settings.vector_dtype, z_dim, settings.group_fields)
        record = {
            "shard": url,
            "shard_id": shard_id(url),
            "node": self.node,
            "examples": table.num_rows,
            "read": read.to_dict(),
            "seconds": round(seconds, 3),
            "examples_per_second": round(table.num_rows / seconds, 2) if seconds else 0.0,
        }
        return self.publish(url, table, record, missing=bool(read.skipped.get("missing_shard")))

    def publish(self, url: str, table, record: dict, missing: bool) -> dict:
        """Part and marker; a missing shard is flagged for the next run first (so a crash
        cannot leave it marked done), a found one is unflagged only after its marker."""
        flag = retry_path(shard_id(url))
        if missing:
            self.output.write_bytes(flag, b"")
        marker = publish_part(self.output, shard_id(url), table, record)
        if not missing:
            self.output.delete(flag)  # a no-op unless it was missing before
        return marker

    def open_shard(self, url: str, read: ReadStats) -> Prefetcher:
        """Start streaming and decoding a shard now, in a background thread.

        Called before the compute lock is taken, so the next shard queued on this worker
        downloads and decodes while the current one computes.
        """
        samples = read_shard(
            url,
            decode_side(self.config),
            self.channels,
            read,
            self.config.input.max_pixels,
            decode_threads=self.config.runtime.decode_threads,
        )
        return Prefetcher(samples, depth=4 * self.engine.examples_per_batch())

    def batches(self, samples: Iterable, limit: int = 0) -> Iterator[Batch]:
        batch = Batch(torch.empty(0), [])
        pending: list[torch.Tensor] = []
        for count, sample in enumerate(samples):
            if limit and count >= limit:
                break
            pending.append(sample.image)
            batch.keys.append(sample.key)
            batch.cls.append(sample.cls)
            batch.metadata.append(sample.metadata)
            batch.pixel_hashes.append(sample.pixel_hash)
            batch.tar_offsets.append(sample.tar_offset)
            batch.tar_sizes.append(sample.tar_size)
            if len(pending) == self.engine.examples_per_batch():
                batch.images = torch.stack(pending)
                yield batch
                batch, pending = Batch(torch.empty(0), []), []
        if pending:
            batch.images = torch.stack(pending)
            yield batch


class ShardReadError(OSError):
    """The shard's stream failed after storage retries: the shard is retried, never marked
    done with a prefix of its examples (bad *data* is skipped and counted; a failing
    *store* is not bad data)."""


def check_stream(url: str, read: ReadStats) -> None:
    digest = read.shards.get(url)
    if digest is not None and digest.error == "read_error":
        raise ShardReadError(f"reading {url} failed after retries; the shard will be retried")


class Rows:
    """Collects one shard's rows batch by batch."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.cls: list[int | None] = []
        self.metadata: list[dict] = []
        self.pixel_hashes: list[str] = []
        self.tar_offsets: list[int | None] = []
        self.tar_sizes: list[int | None] = []
        self.w: list[torch.Tensor] = []
        self.loss: list[torch.Tensor] = []
        self.z: list[torch.Tensor] = []

    def add(
        self, batch: Batch, w: torch.Tensor, loss: torch.Tensor, z: torch.Tensor | None
    ) -> None:
        self.keys += batch.keys
        self.cls += batch.cls
        self.metadata += batch.metadata
        self.pixel_hashes += batch.pixel_hashes
        self.tar_offsets += batch.tar_offsets
        self.tar_sizes += batch.tar_sizes
        self.w.append(w)
        self.loss.append(loss)
        if z is not None:
            self.z.append(z.float().cpu())

    def table(
        self,
        url: str,
        dimension: int,
        vector_dtype: str,
        z_dim: int | None = None,
        group_fields: list[str] | None = None,
    ):
        w = torch.cat(self.w) if self.w else torch.empty(0, dimension)
        loss = torch.cat(self.loss) if self.loss else torch.empty(0)
        # An empty shard's part keeps the z column, so every part has one schema.
        z = torch.cat(self.z) if self.z else (torch.empty(0, z_dim) if z_dim else None)
        return part_table(
            self.keys,
            url,
            w.numpy(),
            w.pow(2).sum(1).numpy(),
            loss.numpy(),
            self.cls,
            self.metadata,
            vector_dtype,
            pixel_hashes=self.pixel_hashes,
            z=z.numpy() if z is not None else None,
            tar_spans=(self.tar_offsets, self.tar_sizes),
            group_fields=group_fields,
        )


_DONE = object()


class Prefetcher:
    """Runs an iterator in a background thread from construction on, `depth` items ahead.

    The producer's exceptions surface in the consumer; `close` stops the producer early.
    """

    def __init__(self, items: Iterator, depth: int) -> None:
        self.buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(items,), daemon=True)
        self.thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                if self.stopped.is_set():
                    break
                self.buffer.put(item)
            self.buffer.put(_DONE)
        except BaseException as error:
            self.buffer.put(error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator:
        while (item := self.buffer.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():
            try:
                self.buffer.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.05)
