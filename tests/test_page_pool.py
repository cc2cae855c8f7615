"""A page pool's insert of pages holding each model KV head once, where tensor parallelism above
the KV heads repeats each head in the cache (a swap's host copy, a stage actor's pages),
checked against NumPy: each device receives only the head it holds, and the pages land
repeated as the pool holds them."""
from __future__ import annotations

import jax
import numpy as np

from dsjax.executor.kv_cache import PagePool
from dsjax.executor.parallel import stage_mesh


def test_pages_with_each_kv_head_once_reach_each_device_as_the_head_it_repeats(monkeypatch):
    devices = jax.devices()[:4]
    layers, pages, page_size, model_heads, head_dim = 2, 8, 4, 2, 3
    pool = PagePool(stage_mesh(devices), layers, pages, page_size, 4, head_dim, np.float32)
    rng = np.random.default_rng(0)
    k_once, v_once = (rng.standard_normal((layers, 2, page_size, model_heads, head_dim))
                      .astype(np.float32) for _ in range(2))
    placed, device_put = [], jax.device_put

    def watching(x, *args, **kwargs):
        out = device_put(x, *args, **kwargs)
        if getattr(x, "ndim", 0) == 5:   # the pages (not the block ids)
            placed.append(out)
        return out
    monkeypatch.setattr(jax, "device_put", watching)
    pool.insert([5, 1], k_once, v_once)
    monkeypatch.undo()

    assert len(placed) == 2
    for arrived, once in zip(placed, (k_once, v_once)):
        for shard in arrived.addressable_shards:
            # Device d holds cache head d: model head d // 2 (the pool repeats h0 h0 h1 h1).
            head = devices.index(shard.device) // 2
            np.testing.assert_array_equal(np.asarray(shard.data), once[:, :, :, head:head + 1])
    for cache, once in ((pool.k, k_once), (pool.v, v_once)):
        held = np.asarray(cache)
        np.testing.assert_array_equal(held[:, [5, 1]], np.repeat(once, 2, axis=3))
        assert not held[:, [0, 2, 3, 4, 6, 7]].any()
