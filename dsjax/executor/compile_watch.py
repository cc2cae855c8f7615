"""Count and name the programs this process lowers (or loads from the program store) after a
point (e.g. after warm-up).

Every new specialisation of a jitted function, and every eager operation on a new shape, is
lowered to MLIR once, whether XLA then compiles it or the persistent cache supplies it; both
add executable memory that is never returned. A serving process should lower nothing after it
reports ready: `CompileWatch` is how tests and benchmarks check that.

A program lowered once still compiles again for each device it runs on alone (a slice on
device 0, then the same slice on device 3): only `backend_compiles` sees those.
"""
from __future__ import annotations

import collections
import threading

import jax

from dsjax.executor.program_store import LOAD_EVENT

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileWatch:
    """Context manager: `names` counts each lowered program's name while it is open, and
    `backend_compiles` XLA's compiles (a lowered program's compile for another device too)."""

    def __init__(self):
        self.names: collections.Counter = collections.Counter()
        self.backend_compiles = 0
        self._lock = threading.Lock()

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event in (_LOWERING_EVENT, LOAD_EVENT):
            with self._lock:
                self.names[str(kwargs.get("fun_name", "?"))] += 1
        elif event == _BACKEND_COMPILE_EVENT:
            with self._lock:
                self.backend_compiles += 1

    @property
    def count(self) -> int:
        return sum(self.names.values())

    def __enter__(self) -> "CompileWatch":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


def memory_mappings() -> int:
    """Lines of /proc/self/maps: each loaded executable adds mappings that are never freed."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)
