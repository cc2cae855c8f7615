"""Helpers shared by the benchmark scripts: device peaks and timing."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def timed(fn, *, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn() (which must block until its device work is done)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


def measure_bandwidth(device=None, nbytes: int = 256 << 20) -> float:
    """Bytes/s of a device-memory copy (read + write counted)."""
    x = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), device or jax.devices()[0])
    copy = jax.jit(lambda a: a + 1.0)
    seconds = timed(lambda: copy(x).block_until_ready())
    return 2 * nbytes / seconds


def measure_read_bandwidth(device=None, nbytes: int = 512 << 20) -> float:
    """Bytes/s of summing an array already in memory: reads only. measure_bandwidth's copy
    also writes a fresh output, and on a VM its first-touch page faults dominate."""
    x = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), device or jax.devices()[0])
    total = jax.jit(jnp.sum)
    return nbytes / timed(lambda: total(x).block_until_ready())


def measure_matmul_flops(dtype=jnp.bfloat16, n: int = 4096, device=None) -> float:
    """FLOP/s of an n x n x n matmul in dtype (a practical peak)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        n = min(n, 1024)
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(lambda x: x @ x)
    seconds = timed(lambda: mm(a).block_until_ready())
    return 2 * n ** 3 / seconds
