"""The stored search index served by Ray actors, and a Ray-backed map for building it.

`SearchService` starts actors that each open a contiguous subset of the search shards
(`SearchStore(index, shards=[...])`, so each holds only its shards' memory maps and cache
files), fans every query batch out to all of them and merges their top-k: the same answer as
one local `SearchStore` over every shard. `cluster_map` runs `build_search_index`'s shard builds
as Ray tasks, one shard's vector block per task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from pipeline.config import RuntimeConfig
from pipeline.index.layout import SEARCH_DIR
from pipeline.index.reader import Index
from pipeline.index.searchstore import (
    SearchStore,
    check_current,
    merge_top_k,
    read_search_manifest,
)
from pipeline.runtime.tasks import MapFn, ray_map


class SearchShardActor:
    """One actor's share of the search shards (plain class; `SearchService` makes it remote)."""

    def __init__(self, uri: str, directory: str, shards: list[int]) -> None:
        self.store = SearchStore(Index(uri), directory=directory, shards=shards)

    def ready(self) -> int:
        return len(self.store.shards)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        opponents: bool,
        nprobe: int | None,
        candidates: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.store.search(queries, k, opponents, nprobe, candidates)


class SearchService:
    """Search shards spread over `actors` Ray actors (at most one per shard); `search` has
    `SearchStore.search`'s signature and results. Call `close` (or use `with`) to stop them."""

    def __init__(
        self,
        uri: str,
        actors: int = 2,
        directory: str = SEARCH_DIR,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> None:
        index = Index(uri)
        manifest = read_search_manifest(index, directory)
        if manifest is None:
            raise FileNotFoundError(f"no search index under {index.storage.url(directory)}")
        check_current(index, manifest)
        self.rows = int(manifest["rows"])
        groups = [
            g.tolist() for g in np.array_split(np.arange(len(manifest["shards"])), actors) if len(g)
        ]
        remote = ray.remote(SearchShardActor).options(num_cpus=num_cpus, num_gpus=num_gpus)
        self.actors = [remote.remote(uri, directory, group) for group in groups]
        ray.get([actor.ready.remote() for actor in self.actors])  # open errors surface here

    def search(
        self,
        queries: np.ndarray,
        k: int,
        opponents: bool = False,
        nprobe: int | None = None,
        candidates: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        batch = ray.put(np.asarray(queries, np.float32))  # once, read by every actor
        found = ray.get(
            [a.search.remote(batch, k, opponents, nprobe, candidates) for a in self.actors]
        )
        scores = np.hstack([f[0] for f in found])
        rows = np.hstack([f[1] for f in found])
        # Actors hold shards in order, so ties break as in one store over every shard.
        return merge_top_k(scores, rows, k, ascending=opponents)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> SearchService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cluster_map(runtime: RuntimeConfig) -> MapFn | None:
    """A `map_fn` for `build_search_index` where this process is connected to Ray (build's
    driver): the shard builds as Ray tasks (`pipeline.runtime.tasks.ray_map`: retried, a
    bounded number in flight), a single shard here; else None (its default thread pool)."""
    if not ray.is_initialized():
        return None
    tasks, _ = ray_map(runtime)

    def run(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return tasks(fn, items) if len(items) > 1 else [fn(item) for item in items]

    return run
