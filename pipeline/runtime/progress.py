"""Progress on the driver: items done of a total, examples, examples/s, ETA.

On a terminal (the stream is a TTY) a tqdm bar; otherwise (logs, Ray job logs, tests) a
plain line every `every` seconds and one at the end. Always on stderr: stdout carries results.
`Counted` counts a mapped function's finished items, in this process or, for Ray tasks
(pipeline.runtime.tasks.ray_map), on the driver as their results arrive.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """`update` after each finished item; `close` (or reaching the total) ends it.

    `enabled=False` prints nothing. Thread-safe: items may finish in worker threads.
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "shards",
        every: float = 2.0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.shards = 0  # items done (shards, batches, steps: `unit`)
        self.examples = 0
        self.note = ""
        self.started = time.perf_counter()
        self.last_print = float("-inf")  # the first update prints
        self.printed = 0  # items done at the last line printed
        self.closed = False
        self.lock = threading.Lock()
        self.bar = self._bar() if enabled and _is_tty(self.stream) else None

    def _bar(self):
        from tqdm import tqdm

        return tqdm(
            total=self.total,
            desc=self.label,
            unit=self.unit,  # plural reads right in the rate too ("shards/s")
            file=self.stream,
            dynamic_ncols=True,
            mininterval=0.5,
            disable=False,  # the stream is a terminal (decided above)
        )

    def update(self, examples: int = 0, done: int = 1, note: str = "") -> None:
        """`done` more items finished, holding `examples` examples; `note` (e.g. the loss)
        is shown after the counts."""
        with self.lock:
            self.shards += done
            self.examples += examples
            self.note = note or self.note
            if not self.enabled or self.closed:
                return
            if self.bar is not None:
                self._advance(done)
            else:
                now = time.perf_counter()
                if now - self.last_print >= self.every or self.shards >= self.total:
                    self.last_print = now
                    self._print(now)
            if self.shards >= self.total:
                self._close()

    def _advance(self, done: int) -> None:
        postfix = f"{self.examples:,} examples" if self.examples else ""
        postfix = ", ".join(p for p in (postfix, self.note) if p)
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(done)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        left = self.total - self.shards
        eta = _duration(elapsed / self.shards * left) if self.shards and left > 0 else "0m00s"
        parts = [f"{self.label}: {self.shards}/{self.total} {self.unit}"]
        if self.examples:
            parts += [f"{self.examples:,} examples", f"{self.examples / elapsed:,.1f} examples/s"]
        parts += [f"elapsed {_duration(elapsed)}", f"ETA {eta}"]
        return ", ".join(parts + ([self.note] if self.note else []))

    def close(self) -> None:
        """End the bar (or print the last line) short of the total, e.g. after failures."""
        with self.lock:
            shown = self.printed == self.shards  # or nothing done: no line to add
            if self.enabled and not self.closed and self.bar is None and not shown:
                self._print(time.perf_counter())
            self._close()

    def _print(self, now: float) -> None:
        self.printed = self.shards
        print(self.line(now), file=self.stream, flush=True)

    def _close(self) -> None:
        if not self.closed and self.bar is not None:
            self.bar.close()
        self.closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rate(self) -> float:
        return self.examples / max(time.perf_counter() - self.started, 1e-9)

    def counted(
        self, fn: Callable[[Any], Any], examples: Callable[[Any, Any], int] | None = None
    ) -> Counted:
        """`fn` counting each finished item here (`examples(item, result)` examples each)."""
        return Counted(fn, self, examples)


def _plain(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return fn


class Counted:
    """`fn(item)` that updates a Progress when it returns. Pickled (sent to another
    process) it becomes `fn` itself: the count stays with the process that holds the bar;
    `ray_map` sends `fn` and calls `count` on the driver instead."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        progress: Progress,
        examples: Callable[[Any, Any], int] | None = None,
    ) -> None:
        self.fn, self.progress, self.examples = fn, progress, examples

    def __call__(self, item: Any) -> Any:
        result = self.fn(item)
        self.count(item, result)
        return result

    def count(self, item: Any, result: Any) -> None:
        self.progress.update(self.examples(item, result) if self.examples else 0)

    def __reduce__(self):
        return (_plain, (self.fn,))
