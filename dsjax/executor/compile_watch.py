"""Count and name the programs this process lowers (or loads from the program store) after a
point (e.g. after warm-up).

Every new specialisation of a jitted function, and every eager operation on a new shape, is
lowered to MLIR once, whether XLA then compiles it or the persistent cache supplies it; both
add executable memory that is never returned. A serving process should lower nothing after it
reports ready: `CompileWatch` is how tests and benchmarks check that.

A program lowered once still compiles again for each device it runs on alone (a slice on
device 0, then the same slice on device 3): only XLA's compile events show those.
"""
from __future__ import annotations

import collections
import threading

import jax

from dsjax.executor.program_store import LOAD_EVENT

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileWatch:
    """Context manager: while it is open, `names` counts each lowered (or loaded) program's
    name, and `compiled` each program XLA compiled (or took from JAX's cache), a lowered
    program's compile for another device included."""

    def __init__(self):
        self.names: collections.Counter = collections.Counter()
        self.compiled: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        seen = {_LOWERING_EVENT: self.names, LOAD_EVENT: self.names,
                _BACKEND_COMPILE_EVENT: self.compiled}.get(event)
        if seen is not None:
            with self._lock:
                seen[str(kwargs.get("fun_name", "?"))] += 1

    @property
    def count(self) -> int:
        """Programs lowered, loaded or compiled: 0 when nothing new was made."""
        return sum(self.names.values()) + sum(self.compiled.values())

    def describe(self) -> str:
        return f"lowered or loaded {dict(self.names)}, compiled {dict(self.compiled)}"

    def __enter__(self) -> "CompileWatch":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


def memory_mappings() -> int:
    """Lines of /proc/self/maps: each loaded executable adds mappings that are never freed."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)
