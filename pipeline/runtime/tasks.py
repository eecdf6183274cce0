"""Parallel maps for the offline verbs: threads in this process, or Ray tasks.

`map_fn(fn, items) -> [fn(item) ...]` in order. The work (`fn`) is a plain function with no
Ray in it; this module is the only place that knows about Ray tasks: each item is one task
(`num_cpus` = runtime.cpus_per_worker, retried up to runtime.max_retries times when it
raises or its worker dies), at most a fixed number in flight, so the driver holds only the
references and results of those.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import RuntimeConfig
from pipeline.runtime.progress import Counted

MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], list]


def local_workers(runtime: RuntimeConfig) -> int:
    """Items at once in this process: runtime.num_workers, else all CPUs / cpus_per_worker."""
    cpus = os.cpu_count() or 1
    return runtime.num_workers or max(1, int(cpus // max(1.0, runtime.cpus_per_worker)))


def thread_map(workers: int) -> MapFn:
    def run(fn: Callable[[Any], Any], items: Iterable[Any]) -> list:
        items = list(items)
        if len(items) <= 1 or workers <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(workers, len(items))) as pool:
            return list(pool.map(fn, items))

    return run


def ray_map(runtime: RuntimeConfig) -> tuple[MapFn, int]:
    """A map over Ray tasks on the cluster `connect` joins; also the tasks kept in flight
    (runtime.num_workers, else the cluster's CPUs / cpus_per_worker)."""
    import ray

    from pipeline.runtime.pool import connect

    connect(runtime)
    cpus = max(0.0, float(runtime.cpus_per_worker))
    total = float(ray.cluster_resources().get("CPU", 1))
    in_flight = runtime.num_workers or max(1, int(total // max(1.0, cpus)))
    call = ray.remote(_call).options(
        num_cpus=cpus, max_retries=runtime.max_retries, retry_exceptions=True
    )

    def run(fn: Callable[[Any], Any], items: Iterable[Any]) -> list:
        items = list(items)
        if not items:
            return []
        # Sent to the object store once, not once per task; a Counted fn counts here.
        count = fn.count if isinstance(fn, Counted) else None
        shared = ray.put(fn.fn if isinstance(fn, Counted) else fn)
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        following = iter(enumerate(items))
        for number, item in following:
            pending[call.remote(shared, item)] = number
            if len(pending) >= in_flight:
                break
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            done = pending.pop(ready[0])
            results[done] = ray.get(ready[0])
            if count is not None:
                count(items[done], results[done])
            for number, item in following:
                pending[call.remote(shared, item)] = number
                break
        return results

    return run, in_flight


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)
