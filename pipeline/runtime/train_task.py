"""`train` on a Ray worker: the training loop (`pipeline.train.training`, no Ray in it) run
as one Ray task, on a GPU where the cluster has one, its steps streamed back to the driver.

The task is a Ray generator: it yields the steps done since its last yield (at most every
STREAM_SECONDS, so a fast loop does not make an object per step), then the trained weights,
which the driver writes. A task whose worker or node is lost is run again from the start
(the run is seeded: it trains the same), up to runtime.max_retries times; an error raised by
the run itself is not retried and comes back as itself (a user mistake: one line).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayError, RayTaskError

from pipeline.runtime.pool import WORKER_ENV, connect, worker_resources

if TYPE_CHECKING:
    from pipeline.train import Step, Trained, TrainJobConfig

log = logging.getLogger(__name__)

STREAM_SECONDS = 0.5


def remote_training(config: TrainJobConfig, shards: list[str]) -> Iterator[list | Trained]:
    """Runs in the Ray task: lists of Steps as they come, then the Trained weights."""
    from pipeline.train import Trained, training

    node = ray.get_runtime_context().get_node_id()
    pending: list[Step] = []
    last = time.monotonic()
    for event in training(config, shards):
        if isinstance(event, Trained):
            if pending:
                yield pending
            event.where = f"ray node {node}"
            yield event
            return
        pending.append(event)
        if time.monotonic() - last >= STREAM_SECONDS:
            yield pending
            pending, last = [], time.monotonic()


def events(refs: Iterable[ray.ObjectRef]) -> Iterator[Step | Trained]:
    """The task's stream flattened back into single events."""
    for ref in refs:
        item = ray.get(ref)
        if isinstance(item, list):
            yield from item
        else:
            yield item


def train_on_ray(
    config: TrainJobConfig,
    shards: list[str],
    follow: Callable[[Iterable[Step | Trained]], Trained],
) -> Trained:
    """Train in one Ray task; `follow` consumes its events on the driver (progress, loss)
    and returns the Trained weights."""
    connect(config.runtime)
    _, resources = worker_resources(config.runtime)
    task = ray.remote(remote_training).options(
        max_retries=0,  # retried here: a replayed stream would repeat the steps shown
        runtime_env={"env_vars": WORKER_ENV},
        **resources,
    )
    log.info("training in a Ray task with %s", resources)
    attempt = 0
    while True:
        try:
            return follow(events(task.remote(config, shards)))
        except RayTaskError as error:  # raised by the run: the same again on a retry
            if isinstance(error.cause, Exception):  # as if it ran here (a mistake: one line)
                raise error.cause from error
            raise
        except RayError as error:  # the worker or its node was lost
            attempt += 1
            if attempt > config.runtime.max_retries:
                raise
            log.warning("the train task was lost (%s); running it again", error)
