"""Compiled step programs kept on disk, so a warm start neither traces nor lowers them again.

JAX's persistent compilation cache saves only the compile: before it can look a program up it
traces the Python function and lowers it to StableHLO (for opt-125m, 11 of a warm start's 33 s
in `benchmarks/profile_startup.py`). This store keeps each step program's executable
(jax.experimental's serialize_executable) under a key made of everything that shapes it, so a
warm start loads it in milliseconds and calls it directly.

The key: the source of every dsjax module and model (a code change misses), the jax, jaxlib,
flax and ml_dtypes versions, every jax setting, XLA_FLAGS, the backend, its devices and (on a
CPU) the instruction set, what built the stage (model, layers, pool, dtype, attention), the
program's own key (mode, input layout) and every argument's shape, dtype and sharding. A key
that cannot be made stable (an object's repr with its address) is never stored: the program
compiles as it would without the store. The store lives beside the compilation cache
(`<cache dir>/dsjax-programs`) and is on exactly when that cache is; nothing is evicted (each
code version writes its own files, as it writes its own JAX cache entries). A file that fails
to load, or whose first run fails, is removed and the program compiled again.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import jax
from jax.experimental import serialize_executable

log = logging.getLogger("dsjax")

STORE_DIRNAME = "dsjax-programs"
# Recorded for every program loaded from the store: like a lowering, a load after ready maps
# new executable memory (dsjax.executor.compile_watch counts both).
LOAD_EVENT = "/dsjax/program_store/load_duration"

# An executable that JAX's persistent cache loaded serializes without its code (jax 0.10.2 on
# CPU: it then fails with "Function ... not found"), so only fresh compiles are stored. Compiled
# with options no other program uses, numbered by the environment's key (a harmless debug
# setting that JAX's cache key covers), a stored program has JAX cache entries of its own, new
# with every code version: they hit only when its store file was lost, and it is then not
# stored. The options also turn dumping off for step programs (XLA_FLAGS' --xla_dump_to).
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_thread = threading.local()
_once = threading.Lock()
_warned: set[str] = set()


def _compile_options(environment_digest: str) -> dict:
    return {"xla_enable_dumping": False,
            "xla_debug_buffer_assignment_show_max": 1_000_000 + int(environment_digest[:6], 16)}


def _count_cache_hit(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:   # runs on the compiling thread
        _thread.hits = getattr(_thread, "hits", 0) + 1


def _cache_hits() -> int:
    """JAX cache hits of this thread's compiles so far (the listener starts on first use)."""
    with _once:
        if not getattr(_count_cache_hit, "registered", False):
            jax.monitoring.register_event_listener(_count_cache_hit)
            _count_cache_hit.registered = True
    return getattr(_thread, "hits", 0)


def _warn_once(kind: str, message: str, *args) -> None:
    with _once:
        first = kind not in _warned
        _warned.add(kind)
    if first:
        log.warning(message, *args)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every dsjax source file, the models' included (they install as dsjax.models
    from a folder of their own): an edit makes a new key."""
    import dsjax
    import dsjax.models
    digest = hashlib.sha256()
    for root in sorted({Path(p).resolve() for p in [*dsjax.__path__, *dsjax.models.__path__]}):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _libraries() -> tuple:
    import flax
    import jaxlib
    import ml_dtypes
    cpu_flags = ""
    try:   # an executable built for one instruction set may not run on another
        with open("/proc/cpuinfo") as f:
            cpu_flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return (code_fingerprint(), jax.__version__, jaxlib.__version__, flax.__version__,
            ml_dtypes.__version__, hashlib.sha256(cpu_flags.encode()).hexdigest())


def _environment() -> tuple:
    device = jax.devices()[0]
    return (_libraries(), device.platform, device.client.platform_version, device.device_kind,
            len(jax.devices()), os.environ.get("XLA_FLAGS", ""),
            tuple(sorted((k, str(v)) for k, v in jax.config.values.items())))


def _signature(args) -> str:
    """Every argument's tree, shapes, dtypes and shardings (NumPy ones stand on the host)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    parts = [repr(tree)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        parts.append(f"{getattr(x, 'shape', ())}/{getattr(x, 'dtype', type(x).__name__)}/"
                     f"{getattr(x, 'weak_type', '')}/{sharding!r}")
    return "|".join(parts)


class ProgramStore:
    """Executables on disk, one file per (stage, program, argument signature)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.loaded = self.compiled = 0   # counts, for tests and logs

    @classmethod
    def for_process(cls) -> "ProgramStore | None":
        """The store beside this process's compilation cache, or None when that is off."""
        cache = jax.config.jax_compilation_cache_dir
        return cls(Path(cache) / STORE_DIRNAME) if cache else None

    def program(self, stage_key: str, devices, key, make: Callable, args
                ) -> tuple[Callable, Path | None]:
        """(A callable running `make()`'s jitted function on arguments shaped like `args`, on
        `devices` (the stage's, in mesh order), the file it was loaded from): loaded when
        stored, else compiled (and stored; the file is then None)."""
        environment = repr(_environment())
        text = repr((environment, stage_key, key, _signature(args)))
        if " at 0x" in text:   # an address in some repr: this key would never match again
            _warn_once("unstable", "a step program's key is not stable (an object's address "
                       "in %s): such programs are not stored", key[0])
            return make(), None
        path = self.directory / (hashlib.sha256(text.encode()).hexdigest() + ".bin")
        started = time.perf_counter()
        loaded = self._load(path, args, devices)
        if loaded is not None:
            self.loaded += 1
            jax.monitoring.record_event_duration_secs(
                LOAD_EVENT, time.perf_counter() - started, fun_name=str(key[0]))
            return loaded, path
        lowered = make().lower(*args)
        hits = _cache_hits()
        try:
            options = _compile_options(hashlib.sha256(environment.encode()).hexdigest())
            compiled = lowered.compile(compiler_options=options)
        except Exception as e:  # noqa: BLE001 - a jaxlib without these options: no store
            _warn_once("options", "the program store is off: this jaxlib refused its compile "
                       "options (%s: %s)", type(e).__name__, e)
            return make(), None
        self.compiled += 1
        if _cache_hits() == hits:
            self._save(path, compiled)
        else:   # from JAX's cache: serialized again it would lack its code (see above)
            log.info("program %s came from JAX's compilation cache, not stored", key[0])
        return compiled, None

    def discard(self, path: Path, error: Exception) -> None:
        """Remove a stored program whose first run failed: the next start compiles it."""
        log.warning("stored program %s failed on its first run (%s: %s): removed", path,
                    type(error).__name__, error)
        path.unlink(missing_ok=True)

    @staticmethod
    def _load(path: Path, args, devices):
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            payload, out_example = pickle.loads(blob)
            return serialize_executable.deserialize_and_load(
                payload, jax.tree_util.tree_structure((args, {})),
                jax.tree_util.tree_structure(out_example), execution_devices=devices)
        except Exception as e:  # noqa: BLE001 - any unreadable file is compiled again
            log.warning("stored program %s did not load (%s): compiling it again", path.name, e)
            path.unlink(missing_ok=True)   # warned once; a fresh compile may store it again
            return None

    def _save(self, path: Path, compiled) -> None:
        temporary = None
        try:
            payload, _, out_tree = serialize_executable.serialize(compiled)
            # The output tree as an example value (PyTreeDefs do not pickle).
            out_example = jax.tree_util.tree_unflatten(out_tree, [0] * out_tree.num_leaves)
            blob = pickle.dumps((payload, out_example))
            self.directory.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a concurrent reader sees the old file or the new.
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False) as f:
                temporary = f.name
                f.write(blob)
            os.replace(temporary, path)
        except Exception as e:  # noqa: BLE001 - the program runs; only the next start pays
            if temporary:
                Path(temporary).unlink(missing_ok=True)
            log.warning("could not store a compiled program (%s): %s", type(e).__name__, e)
