"""Compiled step programs kept on disk, so a warm start neither traces nor lowers them again.

JAX's persistent compilation cache saves only the compile: before it can look a program up it
traces the Python function and lowers it to StableHLO, and for opt-125m that was 11 of a warm
start's 33 s. This store keeps each step program's executable (jax.experimental's
serialize_executable) under a key made of everything that shapes it, so a warm start loads it
in milliseconds and calls it directly.

The key: the source of every dsjax module (a code change misses), the jax and jaxlib versions,
the backend and its devices, XLA_FLAGS and the jax settings that change a trace, what built
the stage (model, layers, pool, dtype, attention), the program's own key (mode, input layout)
and every argument's shape, dtype and sharding. A key that cannot be made stable (an object's
repr with its address) is never stored: the program compiles as it would without the store.
The store lives beside the compilation cache (`<cache dir>/dsjax-programs`) and is on exactly
when that cache is. A file that fails to load (truncated, from another build) is removed and
the program compiled again. Step programs are compiled with dumping off (XLA_FLAGS'
--xla_dump_to skips them), which gives them JAX cache keys of their own (see below).
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
# jax settings that change what a function traces to.
_TRACE_SETTINGS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_default_prng_impl",
                   "jax_threefry_partitionable", "jax_numpy_dtype_promotion")


# An executable that JAX's persistent cache loaded serializes without its code (jax 0.10.2 on
# CPU: it then fails with "Function ... not found"), so only fresh compiles are stored. Compiled
# with an option no other program uses, a stored program has JAX cache entries of its own:
# those hit only when its store file was lost, and it is then simply not stored.
STORE_COMPILE_OPTIONS = {"xla_enable_dumping": False}
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_thread = threading.local()
_listening = threading.Lock()


def _count_cache_hit(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:   # runs on the compiling thread
        _thread.hits = getattr(_thread, "hits", 0) + 1


def _cache_hits() -> int:
    """JAX cache hits of this thread's compiles so far (the listener starts on first use)."""
    with _listening:
        if not getattr(_count_cache_hit, "registered", False):
            jax.monitoring.register_event_listener(_count_cache_hit)
            _count_cache_hit.registered = True
    return getattr(_thread, "hits", 0)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every dsjax source file (models included): an edit makes a new key."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    files = sorted({p.resolve() for p in root.rglob("*.py")})
    for path in files:
        digest.update(str(path.relative_to(path.parents[1])).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment() -> tuple:
    import jaxlib
    device = jax.devices()[0]
    return (code_fingerprint(), jax.__version__, jaxlib.__version__, device.platform,
            device.client.platform_version, device.device_kind, len(jax.devices()),
            os.environ.get("XLA_FLAGS", ""),
            tuple(str(getattr(jax.config, name, None)) for name in _TRACE_SETTINGS))


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

    def program(self, stage_key: str, devices, key, make: Callable, args) -> Callable:
        """A callable running `make()`'s jitted function on arguments shaped like `args`, on
        `devices` (the stage's, in mesh order): loaded from disk when stored, else compiled
        (and stored)."""
        text = repr((_environment(), stage_key, key, _signature(args)))
        if " at 0x" in text:   # an address in some repr: this key would never match again
            log.debug("program key is not stable, not stored: %s", key)
            return make()
        path = self.directory / (hashlib.sha256(text.encode()).hexdigest() + ".bin")
        started = time.perf_counter()
        loaded = self._load(path, args, devices)
        if loaded is not None:
            self.loaded += 1
            jax.monitoring.record_event_duration_secs(
                LOAD_EVENT, time.perf_counter() - started, fun_name=str(key[0]))
            return loaded
        lowered = make().lower(*args)
        hits = _cache_hits()
        compiled = lowered.compile(compiler_options=STORE_COMPILE_OPTIONS)
        self.compiled += 1
        if _cache_hits() == hits:
            self._save(path, compiled)
        else:   # from JAX's cache: serialized again it would lack its code (see above)
            log.info("program %s came from JAX's compilation cache, not stored", key[0])
        return compiled

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
        try:
            payload, _, out_tree = serialize_executable.serialize(compiled)
            # The output tree as an example value (PyTreeDefs do not pickle).
            out_example = jax.tree_util.tree_unflatten(out_tree, [0] * out_tree.num_leaves)
            blob = pickle.dumps((payload, out_example))
            self.directory.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a concurrent reader sees the old file or the new.
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False) as f:
                f.write(blob)
            os.replace(f.name, path)
        except Exception as e:  # noqa: BLE001 - the program runs; only the next start pays
            log.warning("could not store a compiled program (%s): %s", type(e).__name__, e)
