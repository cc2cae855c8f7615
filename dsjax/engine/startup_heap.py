"""The engine's long-lived start-up objects, kept out of Python's cyclic garbage collector.

Start-up leaves some 200,000 objects that live as long as the engine: JAX's tracing and
compile caches, the parameter tree, the tokenizer, the modules. Every full collection walks all
of them, on whichever thread allocated last: on the 2-vCPU VM one took 155 ms of a decode step
of 256 rows (`benchmarks/bench_engine.py gc`). Freezing them (`gc.freeze`) moves them to a
generation the collector never visits; reference counting still frees them. vLLM's engine core
freezes its start-up heap for the same reason.

An engine freezes once it is ready and releases at shutdown. When no engine holds the freeze,
the frozen objects go back to the collector, so the garbage cycles of an engine that stopped
are freed in a process that starts many (notebooks, tests). Instance processes freeze once
their worker is built and never release: they end with their instance.
"""
from __future__ import annotations

import gc
import threading
import time

_lock = threading.Lock()
_holders = 0


def freeze_startup_heap() -> float:
    """Collect once, then freeze every object that survived; the seconds it took."""
    global _holders
    with _lock:
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        _holders += 1
        return time.perf_counter() - started


def release_startup_heap() -> None:
    """One holder is done; the last one hands the frozen objects back to the collector."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        if _holders == 0:
            gc.unfreeze()
