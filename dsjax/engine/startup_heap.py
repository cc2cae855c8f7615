"""The engine's long-lived start-up objects, kept out of Python's cyclic garbage collector.

Start-up leaves 200,000-400,000 objects (opt-tiny; `bench_engine.py gc` prints the count)
that live as long as the engine: JAX's tracing and compile caches, the parameter tree, the
tokenizer, the modules. Every full collection walks all of them, on whichever thread
allocated last: on the 2-vCPU VM the decode thread ran ones of 122-198 ms inside steps of 256
rows (`benchmarks/bench_engine.py gc`). Freezing them (`gc.freeze`) moves them to a
generation the collector never visits; reference counting still frees them. vLLM's engine core freezes its start-up heap for the same reason.

While frozen, the youngest generation is collected every YOUNG_THRESHOLD allocations instead
of Python's 700: a decode step of 256 rows allocates thousands of short-lived objects, and the
process spent 1.0-2.2 ms a step in collections at 700, 0.5-1.0 ms at 20,000 (two runs of
`bench_engine.py gc`; reference counting frees nearly all of them anyway).

An engine freezes once it is ready and releases at shutdown. Every release hands all frozen
objects back to the collector, even while other engines run: the stopping engine is still
referenced while it releases, so a collection then could not free it, and anything frozen
again would stay until the last engine stops. Its garbage cycles (its pools and params among
them) are freed by later collections, in a process that starts many engines (notebooks,
tests); the next engine to start freezes the heap again. The last release also restores the
process's thresholds. Instance processes (and Ray stage actors) freeze once built and never
release: they end with their instance.
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
    """One holder is done: every frozen object goes back to the collector; the last holder
    restores the process's thresholds."""
    global _holders, _thresholds
    with _lock:
        _holders = max(0, _holders - 1)
        gc.unfreeze()
        if _holders == 0 and _thresholds is not None:
            gc.set_threshold(*_thresholds)
            _thresholds = None
