"""Outputs from the engine's threads onto the server's event loop, one wake-up per burst.

The engine's router delivers every streamed request's output from its own thread, one report
(a decode step of up to hundreds of requests) at a time. Handing each output over with
`loop.call_soon_threadsafe` writes the loop's self-pipe once per output: a system call and a
loop wake-up per token. The mailbox queues them instead and schedules one drain while none is
pending, so a report of 256 tokens wakes the loop once or a few times (vLLM's AsyncLLM
likewise moves a whole step's outputs per hop).
"""
from __future__ import annotations

import asyncio
import collections
import threading


class LoopMailbox:
    """Thread-safe: any thread posts (queue, item); the loop puts each item into its queue,
    in the order posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: collections.deque = collections.deque()
        self._drain_pending = False
        self._closed = False

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            if self._closed:
                return
            self._items.append((queue, item))
            if self._drain_pending:
                return
            self._drain_pending = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed: the server is gone, nobody is listening
            with self._lock:
                self._items.clear()   # and no drain will come: hold nothing, drop what follows
                self._closed = True

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._drain_pending = False
        for queue, item in items:
            queue.put_nowait(item)
