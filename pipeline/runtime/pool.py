"""The thin Ray layer: connect, start worker actors, hand out shards, survive failures.

Shards are dispatched dynamically: each actor holds at most `queue_depth` shards (one
running, the rest ready to start at once), and the next goes to whichever actor frees up
first, so a slow shard never stalls the rest. An actor that dies is replaced (and given the
same setup calls again); its shards go back to the queue. A shard that fails is retried up to
`max_retries` times, then recorded as failed while the rest completes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from pipeline.config import PipelineConfig, RuntimeConfig, to_dict
from pipeline.runtime.worker import ShardWorker

log = logging.getLogger(__name__)


# glibc keeps large buffers mapped instead of returning and re-faulting them per batch:
# benchmarks/results/pipeline.md traced a 23-40% slower model inside actors to page faults.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


# An embedded Ray is this process's own, on loopback, gone when it exits. Ray (2.60 here) turns
# token auth on for any new local cluster whose RAY_AUTH_MODE is unset, warns on every start
# and writes ~/.ray/auth_token (ray/_private/authentication/authentication_token_setup.py);
# "disabled" keeps it quiet and the home folder untouched. Set for the driver's environment,
# which the raylet and workers inherit. Never for a cluster joined by address.
EMBEDDED_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def connect(runtime: RuntimeConfig) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start an embedded local Ray."""
    if ray.is_initialized():
        return
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    for name, value in EMBEDDED_ENV.items():  # what the user set wins
        os.environ.setdefault(name, value)
    temp_dir = runtime.temp_dir or os.path.join(tempfile.gettempdir(), f"issl-ray-{os.getuid()}")
    ray.init(
        address="local",
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        log_to_driver=True,
    )


def worker_resources(runtime: RuntimeConfig) -> tuple[int, dict[str, float]]:
    """How many workers and what each asks Ray for."""
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    gpus = runtime.gpus_per_worker if runtime.gpus_per_worker >= 0 else (1 if cluster_gpus else 0)
    count = runtime.num_workers or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    return count, {"num_cpus": runtime.cpus_per_worker, "num_gpus": gpus}


class RayShardWorker(ShardWorker):
    """ShardWorker as an actor: knows its Ray node, so markers say where a shard ran."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.node = ray.get_runtime_context().get_node_id()


@dataclass
class Task:
    """One call on some worker. With `returns=2` the method returns (small, large): the
    driver fetches the small part and gets the large one as an ObjectRef, left in the
    object store for a later task to consume."""

    method: str
    args: tuple
    label: str
    attempts: int = 0
    returns: int = 1
    context: Any = None


@dataclass
class Outcome:
    """What a run did; results go to `on_result` as they come and are not kept here."""

    completed: int = 0
    failures: list[tuple[Task, str]] = field(default_factory=list)
    restarts: int = 0


@dataclass
class _Hooks:
    """What a run's caller wants to hear of failures (see `WorkerPool.run`)."""

    on_failure: Callable[[Task, Exception], list[Task] | None] | None = None
    on_give_up: Callable[[Task, str], list[Task] | None] | None = None


class WorkerPool:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.runtime = config.runtime
        count, self.resources = worker_resources(self.runtime)
        # Threaded actors: a queued shard starts decoding while the current one computes.
        concurrency = max(1, self.runtime.queue_depth)
        self.actor_class = ray.remote(RayShardWorker).options(
            max_restarts=0,
            # One worker per GPU across the nodes: spread, not packed onto the first node.
            scheduling_strategy="SPREAD",
            max_concurrency=concurrency,
            runtime_env={"env_vars": WORKER_ENV},
            **self.resources,
        )
        self.setup_calls: list[tuple[str, tuple]] = []
        self.actors = [self._start() for _ in range(count)]
        log.info("started %d workers with %s", count, self.resources)

    def _start(self):
        actor = self.actor_class.remote(to_dict(self.config))
        # One at a time and waited for: a threaded actor would run them concurrently, and
        # a shard must not start before its worker holds the current state.
        for method, args in self.setup_calls:
            ray.get(getattr(actor, method).remote(*args))
        return actor

    def broadcast(self, method: str, *args: Any) -> None:
        """Call `method` on every worker at once, and on every worker started later.

        Each argument is put into the object store once, so a large one (factors, curvature
        state) is sent to the nodes once, not serialised per call. A worker that dies
        meanwhile is replaced (the replacement gets every setup call).
        """
        refs = tuple(ray.put(arg) for arg in args)
        self.setup_calls.append((method, refs))
        pending = {getattr(a, method).remote(*refs): slot for slot, a in enumerate(self.actors)}
        deaths = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            slot = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except RayActorError as error:
                deaths += 1
                if deaths > self.runtime.max_retries * max(1, len(self.actors)):
                    raise
                log.warning("worker %d died during %s: %s", slot, method, _summary(error))
                self.actors[slot] = self._start()  # replays every setup call, this one too

    def run(
        self,
        tasks: list[Task],
        on_result: Callable[[Task, Any], list[Task] | None],
        on_failure: Callable[[Task, Exception], list[Task] | None] | None = None,
        on_give_up: Callable[[Task, str], list[Task] | None] | None = None,
    ) -> Outcome:
        """Run every task somewhere; `on_result` is called on the driver as each finishes
        and may return further tasks to run. `on_failure` may replace a failed task by
        others (e.g. its halves); when it returns None the task is retried as usual.
        `on_give_up` hears of a task that failed its last attempt (also recorded in the
        outcome) and may return further tasks."""
        hooks = _Hooks(on_failure, on_give_up)
        queue, outcome = deque(tasks), Outcome()
        inflight: dict[ray.ObjectRef, tuple[int, Task, ray.ObjectRef | None]] = {}
        for slot in range(len(self.actors)):
            self._fill(slot, queue, inflight)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            slot, task, large = inflight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as error:
                self._replace(slot, task, inflight, queue, outcome, error, hooks)
            except RayError as error:
                self._failed(task, queue, outcome, error, hooks)
            else:
                outcome.completed += 1
                more = on_result(task, result if large is None else (result, large))
                queue.extend(more or ())
            for any_slot in range(len(self.actors)):
                self._fill(any_slot, queue, inflight)
        return outcome

    def _fill(self, slot: int, queue: deque, inflight: dict) -> None:
        busy = sum(1 for s, _, _ in inflight.values() if s == slot)
        while queue and busy < max(1, self.runtime.queue_depth):
            task = queue.popleft()
            method = getattr(self.actors[slot], task.method)
            if task.returns == 2:
                small, large = method.options(num_returns=2).remote(*task.args)
            else:
                small, large = method.remote(*task.args), None
            inflight[small] = (slot, task, large)
            busy += 1

    def _failed(self, task, queue, outcome, error, hooks: _Hooks) -> None:
        replacement = hooks.on_failure(task, error) if hooks.on_failure else None
        if replacement is None:
            self._retry(task, queue, outcome, error, hooks)
        else:
            log.warning(
                "%s failed (%s); running it as %d parts",
                task.label,
                _summary(error),
                len(replacement),
            )
            queue.extendleft(reversed(replacement))

    def _replace(self, slot, task, inflight, queue, outcome, error, hooks: _Hooks) -> None:
        """The actor died: start a new one; its running task counts an attempt, queued ones not."""
        log.warning("worker %d died on %s: %s; restarting it", slot, task.label, _summary(error))
        outcome.restarts += 1
        stranded = [ref for ref, (s, _, _) in inflight.items() if s == slot]
        for ref in stranded:
            queue.appendleft(inflight.pop(ref)[1])
        self._failed(task, queue, outcome, error, hooks)
        self.actors[slot] = self._start()

    def _retry(self, task: Task, queue: deque, outcome: Outcome, error, hooks: _Hooks) -> None:
        task.attempts += 1
        if task.attempts > self.runtime.max_retries:
            log.error("giving up on %s after %d attempts: %s", task.label, task.attempts, error)
            outcome.failures.append((task, _summary(error)))
            if hooks.on_give_up:
                queue.extend(hooks.on_give_up(task, _summary(error)) or ())
        else:
            log.warning(
                "retrying %s (attempt %d): %s", task.label, task.attempts + 1, _summary(error)
            )
            queue.append(task)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _summary(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
