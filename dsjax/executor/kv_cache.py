"""The device-side page pool of one pipeline stage and its capacity from a memory budget.

Layout and slot convention: models/attention.py. Pages are allocated by BlockManager
(dsjax/block_manager.py); this module owns the arrays and moves whole pages in and out.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.executor.parallel import KV_SPEC

# Leave room on an accelerator for activations and compiled programs beyond the weights.
ACTIVATION_HEADROOM_BYTES = 1 << 30
# On a CPU the "device memory" is the host's: by default an engine's KV cache takes this share
# of the memory available when it starts, split over its devices, within these bounds. vLLM-CPU
# takes 90% of the machine less its own use; a share leaves room for swapped-out KV (host
# memory too), other processes and engines started beside this one (each sees what is left).
CPU_KV_MEMORY_SHARE = 0.3
CPU_KV_MIN_BYTES = 256 << 20
CPU_KV_MAX_BYTES = 4 << 30
# The share is rounded down to a multiple of this. Free memory moves by megabytes between two
# starts; an exact share then gave a different page count, so different shapes for every step
# program, and a restart compiled them all again instead of loading them from the program
# store (warm start 57-61 s against 9 s).
CPU_KV_GRANULE_BYTES = 256 << 20
# Beside the compilation cache: the budget the last start chose, per device count.
CPU_KV_RECORD = "dsjax-cpu-kv-budget.json"


def dtype_bytes(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the shapes programs are compiled for (a
    gather or an insert of n blocks moves bucket(n) pages)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


HEAD_AXIS = 3   # of pages [layers, pages, page_size, heads, head_dim]


def own_pages(pages: np.ndarray, n: int, head_repeat: int = 1) -> np.ndarray:
    """Host pages [layers, padded, page_size, heads, head_dim] cut to the request's n, with
    each model KV head once where the cache repeats each `head_repeat` times (a copy, so the
    padding and the repeats are freed): what a swap keeps, so host memory is what swap_space
    counts."""
    if pages.shape[1] == n and head_repeat == 1:
        return pages
    # (a copy even where the cut is contiguous, one layer: a view would keep the padding)
    return pages[:, :n, :, ::head_repeat].copy()


def padded_pages(pages, n_ids: int):
    """Host pages padded back to the page count an insert of n_ids blocks runs with (one
    program a bucket); arrays already of that count, or on a device, as they are."""
    missing = bucket(n_ids) - pages.shape[1]
    if missing <= 0 or not isinstance(pages, np.ndarray):
        return pages
    return np.pad(pages, [(0, 0), (0, missing)] + [(0, 0)] * (pages.ndim - 2))


def bytes_per_block(config, block_size: int, dtype, tp: int, pp: int) -> int:
    """KV bytes one page costs on one device of a (tp, pp) instance (K and V, its layers and
    its share of the cache's KV heads)."""
    layers = -(-config.num_hidden_layers // pp)
    heads = config.cache_kv_heads(tp) // tp
    return 2 * layers * block_size * heads * config.head_dim * dtype_bytes(dtype)


def num_blocks_for_budget(config, *, block_size: int, dtype, tp: int, pp: int,
                          devices, gpu_memory_utilization: float = 0.9,
                          cpu_kv_cache_bytes: int = CPU_KV_MIN_BYTES) -> int:
    """Pages that fit: a fraction of accelerator memory minus this device's weights, or a byte
    budget per device on CPU (where "device memory" is the host's: see auto_cpu_kv_bytes)."""
    per_block = bytes_per_block(config, block_size, dtype, tp, pp)
    device = devices[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        weights = config.num_params() * dtype_bytes(dtype) / (tp * pp)
        budget = stats["bytes_limit"] * gpu_memory_utilization - weights - ACTIVATION_HEADROOM_BYTES
        if budget < per_block:
            raise ValueError(
                f"{config.name} in {jnp.dtype(dtype).name} leaves no memory for the KV cache on "
                f"{device} at tp={tp}, pp={pp}: raise the parallel degrees or "
                f"--gpu-memory-utilization")
    else:
        budget = cpu_kv_cache_bytes
    return max(1, int(budget // per_block))


def available_memory_bytes() -> int:
    """Memory the kernel says a new allocation can take without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_cpu_kv_bytes(num_devices: int, available: int | None = None) -> int:
    """KV cache bytes per device for an engine of num_devices CPU devices: CPU_KV_MEMORY_SHARE
    of the available memory split over them, rounded down to CPU_KV_GRANULE_BYTES, within
    [CPU_KV_MIN_BYTES, CPU_KV_MAX_BYTES]."""
    available = available_memory_bytes() if available is None else available
    share = CPU_KV_MEMORY_SHARE * available / max(1, num_devices)
    share = int(share) // CPU_KV_GRANULE_BYTES * CPU_KV_GRANULE_BYTES
    return int(min(CPU_KV_MAX_BYTES, max(CPU_KV_MIN_BYTES, share)))


def cpu_kv_bytes_across_nodes(nodes: dict[str, tuple[int, int]], total_devices: int,
                              pinned: dict[str, int] | None = None,
                              smallest_actor: int = 1) -> int:
    """KV cache bytes per device for an engine of total_devices CPU devices on a cluster.
    `nodes`: each node's address -> (its logical CPUs, the memory available on it). A node
    hosts the engine's devices `pinned` there (where the plan places every actor), else as
    many as fit on it, up to all of them (none where fewer than the smallest actor's
    `smallest_actor` devices fit). Each node's auto_cpu_kv_bytes over those devices, and the
    least of them: one page count for every instance, and no node asked for more than its
    share of its own memory."""
    counts = {addr: n for addr, n in (pinned or {}).items() if addr in nodes}
    if not counts:
        counts = {addr: min(total_devices, cpus) for addr, (cpus, _) in nodes.items()
                  if cpus >= max(1, smallest_actor)}
    if not counts:
        raise ValueError("no node of the cluster has a CPU to host an instance: add a node "
                         "with CPUs, or set cpu_kv_cache_bytes")
    return min(auto_cpu_kv_bytes(n, nodes[addr][1]) for addr, n in counts.items())


def steady_cpu_kv_bytes(fresh: int, num_devices: int, directory: str | None) -> int:
    """`fresh` (auto_cpu_kv_bytes), or the budget the last start with this cache directory
    chose for as many devices, where that is within one granule of it (both rounded). The
    page count is every step program's shape: free memory drifting across a granule's edge
    between two starts gives a restart other shapes, and it compiles everything again
    instead of loading its programs (a suspected cause of a 46.9 s warm start against 11-13
    s, docs/benchmarks.md). Records what it returns (best effort: an unwritable directory
    only loses the record)."""
    if not directory:
        return fresh
    path = os.path.join(directory, CPU_KV_RECORD)
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError):
        records = {}
    records = records if isinstance(records, dict) else {}
    recorded = records.get(str(num_devices))
    # A record this version could have chosen (bounds and granule), within a granule of
    # today's, and not above it where today's is the floor (memory is short).
    if (type(recorded) is int and CPU_KV_MIN_BYTES <= recorded <= CPU_KV_MAX_BYTES
            and recorded % CPU_KV_GRANULE_BYTES == 0
            and abs(recorded - fresh) <= CPU_KV_GRANULE_BYTES
            and (recorded <= fresh or fresh > CPU_KV_MIN_BYTES)):
        return recorded
    records[str(num_devices)] = fresh
    try:
        os.makedirs(directory, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as f:
                json.dump(records, f)
            os.replace(partial, path)
        except BaseException:
            os.unlink(partial)
            raise
    except OSError:
        pass
    return fresh


class PagePool:
    """K and V pages of one stage: [layers, pages, page_size, heads, head_dim], heads sharded."""

    def __init__(self, mesh, num_layers: int, num_pages: int, page_size: int, num_heads: int,
                 head_dim: int, dtype, run_program=None):
        # run_program(key, make, donated, *args): how the owning stage runs a program (through
        # its program store, so a warm start loads these instead of tracing them: 48 of them
        # took 15 s of opt-125m's warm-up threads, benchmarks/profile_warmup.py); alone, the
        # pool calls its jitted functions. Held weakly: the stage holds the pool, and a cycle
        # would leave the pages to the collector.
        self._stage_run = weakref.WeakMethod(run_program) if run_program else None
        self.sharding = NamedSharding(mesh, KV_SPEC)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self._by_model_heads: dict[int, NamedSharding] = {}   # _repeated_head_sharding
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_layers, num_pages, page_size, num_heads, head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.sharding)
        self.k = zeros()
        self.v = zeros()

    def padded_ids(self, block_ids, fill: int) -> np.ndarray:
        """Block ids padded to a power of two (bounded recompiles); padding reads page `fill`."""
        ids = np.full(bucket(len(block_ids)), fill, np.int32)
        ids[:len(block_ids)] = block_ids
        return ids

    def gather(self, block_ids) -> tuple[jax.Array, jax.Array]:
        """Copies of the given pages, [layers, n_padded, page_size, heads, head_dim] each."""
        ids = jax.device_put(self.padded_ids(block_ids, 0), self.replicated)
        (pages,) = self._run(("gather", len(ids)), lambda: _gather, (), self.k, self.v, ids)
        return pages

    def _run(self, key, make, donated, *args):
        run = self._stage_run() if self._stage_run is not None else None
        return run(key, make, donated, *args) if run is not None else make()(*args)

    def insert(self, block_ids, k_pages, v_pages) -> None:
        """Write pages (as returned by gather, padding included, or host arrays of their
        shape) at block_ids, in place. Pages may hold each model KV head once where the pool
        repeats each (a swap's host copy, a stage actor's pages): the program repeats them."""
        heads = k_pages.shape[HEAD_AXIS]
        ids = jax.device_put(self.padded_ids(block_ids, self.num_pages), self.replicated)
        # Placed as the pool is, so one program (one stored executable) serves pages from the
        # host and from this pool alike (migration reshards onto this mesh before it inserts);
        # pages with fewer heads than the pool go to each device as the head it repeats.
        place = self.sharding if heads == self.k.shape[HEAD_AXIS] else \
            self._repeated_head_sharding(heads)
        k_pages, v_pages = (jax.device_put(a, place) for a in (k_pages, v_pages))
        _, self.k, self.v = self._run(("insert", len(ids), str(k_pages.dtype), heads),
                                      lambda: _insert, INSERT_DONATED, self.k, self.v, ids,
                                      k_pages, v_pages)

    def _repeated_head_sharding(self, heads: int) -> NamedSharding:
        """Pages with each of `heads` model KV heads once, split so that each device gets the
        head its cache shard repeats: device d holds cache head d, model head d // repeat
        (the pool repeats h0 h0 h1 h1), so the same devices as a [heads, repeat] mesh with
        heads on the first axis. Whole pages on every device took 1.2-2.0x as long to insert
        as pages of every cache head (benchmarks/bench_page_insert.py)."""
        sharding = self._by_model_heads.get(heads)
        if sharding is None:
            spec = [None] * 5
            spec[HEAD_AXIS] = "model_kv_heads"
            mesh = Mesh(self.sharding.mesh.devices.reshape(heads, -1),
                        ("model_kv_heads", "repeat"))
            sharding = self._by_model_heads[heads] = NamedSharding(mesh, PartitionSpec(*spec))
        return sharding


# Programs return their result, then the arguments they donate, updated (the form of
# Stage.run_program).
@jax.jit
def _gather(k, v, ids):
    return ((k[:, ids], v[:, ids]),)


INSERT_DONATED = (0, 1)


@functools.partial(jax.jit, donate_argnums=INSERT_DONATED)
def _insert(k, v, ids, k_pages, v_pages):
    repeat = k.shape[HEAD_AXIS] // k_pages.shape[HEAD_AXIS]
    if repeat > 1:   # each model KV head once -> as the pool holds them (h0 h0 h1 h1)
        k_pages, v_pages = (jnp.repeat(a, repeat, axis=HEAD_AXIS) for a in (k_pages, v_pages))
    # Padding ids are out of range (num_pages) and dropped.
    return ((), k.at[:, ids].set(k_pages.astype(k.dtype), mode="drop"),
            v.at[:, ids].set(v_pages.astype(v.dtype), mode="drop"))
