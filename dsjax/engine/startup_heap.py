"""The engine's long-lived start-up objects, kept out of Python's cyclic garbage collector.

Start-up leaves some 200,000 objects that live as long as the engine: JAX's tracing and
compile caches, the parameter tree, the tokenizer, the modules. Every full collection walks all
of them, on whichever thread allocated last: on the 2-vCPU VM one took 155 ms of a decode step
of 256 rows (`benchmarks/bench_engine.py gc`). Freezing them (`gc.freeze`) moves them to a
generation the collector never visits; reference counting still frees them. vLLM's engine core
freezes its start-up heap for the same reason.

While frozen, the youngest generation is collected every YOUNG_THRESHOLD allocations instead
of Python's 700: a decode step of 256 rows allocates thousands of short-lived objects, and at
700 the decode thread spent about 1.1 ms a step in collections, at 20,000 about 0.4 ms (one run
each of `bench_engine.py gc`; reference counting frees nearly all of them anyway).

An engine freezes once it is ready and releases at shutdown. A release hands the frozen
objects back to the collector and collects, so the garbage cycles of an engine that stopped
(its pools and params among them) are freed in a process that starts many (notebooks, tests);
while other engines still hold the freeze, what survives is frozen again. Instance processes
freeze once their worker is built and never release: they end with their instance.
"""
from __future__ import annotations

import gc
import threading
import time

YOUNG_THRESHOLD = 20_000

_lock = threading.Lock()
_holders = 0
_thresholds: tuple[int, ...] | None = None   # the process's own, while an engine holds the heap


def freeze_startup_heap() -> float:
    """Collect once, then freeze every object that survived; the seconds it took."""
    global _holders, _thresholds
    with _lock:
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        if _holders == 0:
            _thresholds = gc.get_threshold()
            gc.set_threshold(max(YOUNG_THRESHOLD, _thresholds[0]), *_thresholds[1:])
        _holders += 1
        return time.perf_counter() - started


def release_startup_heap() -> None:
    """One holder is done: the frozen objects go back to the collector, what the holder left
    behind is collected, and the rest is frozen again while other holders remain."""
    global _holders, _thresholds
    with _lock:
        _holders = max(0, _holders - 1)
        gc.unfreeze()
        if _holders:
            gc.collect()
            gc.freeze()
        elif _thresholds is not None:
            gc.set_threshold(*_thresholds)
            _thresholds = None
