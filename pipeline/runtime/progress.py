"""Progress on the driver: shards and examples done, examples/s, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    def __init__(
        self, label: str, total_shards: int, every: float = 2.0, stream: TextIO | None = None
    ) -> None:
        self.label = label
        self.total = total_shards
        self.every = every
        self.stream = stream or sys.stderr
        self.shards = 0
        self.examples = 0
        self.started = time.perf_counter()
        self.last_print = 0.0

    def update(self, examples: int, done: int = 1) -> None:
        self.shards += done
        self.examples += examples
        now = time.perf_counter()
        if now - self.last_print >= self.every or self.shards == self.total:
            self.last_print = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        rate = self.examples / elapsed
        left = self.total - self.shards
        eta = _duration(elapsed / self.shards * left) if self.shards and left else "0m00s"
        return (
            f"{self.label}: {self.shards}/{self.total} shards, {self.examples:,} examples, "
            f"{rate:,.1f} examples/s, elapsed {_duration(elapsed)}, ETA {eta}"
        )

    @property
    def rate(self) -> float:
        return self.examples / max(time.perf_counter() - self.started, 1e-9)
