"""The discrete-event core: a clock and a heap of pending callbacks."""
from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable


class EventLoop:
    """Runs callbacks in time order; ties run in the order they were scheduled (deterministic)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = itertools.count()

    def at(self, time: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), fn, args))

    def next_time(self) -> float:
        """When the next pending event fires (inf if none)."""
        return self._heap[0][0] if self._heap else float("inf")

    def run(self) -> None:
        heap = self._heap
        while heap:
            time, _, fn, args = heapq.heappop(heap)
            self.now = time
            fn(*args)
