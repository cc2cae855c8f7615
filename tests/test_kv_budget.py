"""How many KV pages an instance gets: a byte budget per device on CPU, by default a share of
the memory free when the engine starts, split over the engine's devices."""
from __future__ import annotations

import json

import jax
import pytest

from dsjax.config import EngineConfig
from dsjax.engine.instance_hosts import with_cpu_kv_budget
from dsjax.executor import kv_cache
from dsjax.executor.kv_cache import (auto_cpu_kv_bytes, cpu_kv_bytes_across_nodes,
                                     num_blocks_for_budget)
from dsjax.executor.parallel import InstancePlan
from dsjax.models.registry import config_from_name

GIB = 1 << 30


def test_the_auto_budget_is_a_share_of_free_memory_over_the_devices_within_bounds():
    """The documented rule (README, design.md): 30% of free memory over the engine's devices,
    256 MiB to 4 GiB each."""
    assert auto_cpu_kv_bytes(2, available=20 * GIB) == 3 * GIB                  # 0.3 x 10 GiB
    # Rounded down to 256 MiB: free memory that moves by a few MB between two starts gives
    # the same page count, so the same step programs (0.3 x 11 GiB = 3.3 GiB -> 3.25 GiB).
    mib = 1 << 20
    assert auto_cpu_kv_bytes(2, available=22 * GIB - 5 * mib) == 3 * GIB + 256 * mib
    assert auto_cpu_kv_bytes(2, available=22 * GIB + 5 * mib) == 3 * GIB + 256 * mib
    assert auto_cpu_kv_bytes(1, available=1024 * GIB) == 4 * GIB      # a big machine
    assert auto_cpu_kv_bytes(8, available=1 * GIB) == 256 << 20       # a busy one


def test_an_engine_resolves_auto_once_for_all_its_devices(monkeypatch):
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda: 30 * GIB)
    plans = [InstancePlan("prefill", 0, 1, 1, (0,)), InstancePlan("decode", 0, 2, 1, (1, 2))]
    # (no compilation cache: no record of an earlier start's budget to keep)
    resolved = with_cpu_kv_budget(EngineConfig(model="opt-tiny", compilation_cache_dir=""),
                                  plans)
    assert resolved.cpu_kv_cache_bytes == int(0.3 * 10 * GIB)   # 30% of 30 GiB over 3 devices
    explicit = EngineConfig(model="opt-tiny", cpu_kv_cache_bytes=123 << 20)
    assert with_cpu_kv_budget(explicit, plans) is explicit


def test_a_clusters_budget_is_the_least_share_of_the_nodes_that_host_the_engine():
    """On a Ray cluster each node's memory is split over the engine's devices it hosts, and
    every instance gets the smallest of those shares (one page count for all)."""
    nodes = {"10.0.0.1": (16, 64 * GIB), "10.0.0.2": (2, 8 * GIB), "10.0.0.3": (0, 99 * GIB)}
    # Unpinned, 4 devices: node 1 may host all 4 (0.3 x 64 / 4 = 4.8 GiB, capped at 4 GiB),
    # node 2 only 2 (0.3 x 8 / 2 = 1.2 GiB, rounded down to 1 GiB); node 3 hosts none.
    assert cpu_kv_bytes_across_nodes(nodes, 4) == GIB
    # Every actor pinned to node 1: node 2's memory does not limit it.
    assert cpu_kv_bytes_across_nodes(nodes, 4, {"10.0.0.1": 4}) == 4 * GIB
    # 3 on node 1, 1 on node 2: 0.3 x 64 / 3 = 6.4 -> 4 GiB; 0.3 x 8 / 1 = 2.4 -> 2.25 GiB.
    assert cpu_kv_bytes_across_nodes(nodes, 4, {"10.0.0.1": 3, "10.0.0.2": 1}) == \
        2 * GIB + (256 << 20)
    # Actors of 4 devices each: node 2 (2 CPUs) can host none, and does not count.
    assert cpu_kv_bytes_across_nodes(nodes, 4, smallest_actor=4) == 4 * GIB
    # A one-node cluster (the local one): the single machine's rule.
    assert cpu_kv_bytes_across_nodes({"a": (16, 20 * GIB)}, 2) == \
        auto_cpu_kv_bytes(2, available=20 * GIB) == 3 * GIB
    with pytest.raises(ValueError, match="no node of the cluster has a CPU"):
        cpu_kv_bytes_across_nodes({"a": (0, GIB)}, 1)


def test_pages_are_the_budget_over_one_page_of_every_layers_k_and_v():
    config = config_from_name("opt-125m")
    pages = num_blocks_for_budget(config, block_size=16, dtype="float32", tp=1, pp=1,
                                  devices=jax.devices("cpu")[:1], cpu_kv_cache_bytes=GIB)
    per_page = 2 * 12 * 16 * 768 * 4   # K and V, 12 layers, 16 tokens, 768 wide, float32
    assert pages == GIB // per_page


def test_a_negative_budget_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="cpu_kv_cache_bytes must be >= 0"):
        EngineConfig(model="opt-tiny", cpu_kv_cache_bytes=-1)


def test_a_restart_keeps_the_last_budget_while_free_memory_drifts_less_than_a_granule(
        tmp_path, monkeypatch):
    """The page count is every program's shape: a warm start must see the cold start's."""
    g = kv_cache.CPU_KV_GRANULE_BYTES
    d = str(tmp_path)
    assert kv_cache.steady_cpu_kv_bytes(13 * g, 2, d) == 13 * g    # the first start records
    assert kv_cache.steady_cpu_kv_bytes(14 * g, 2, d) == 13 * g    # drift up one granule
    assert kv_cache.steady_cpu_kv_bytes(12 * g, 2, d) == 13 * g    # or down
    assert kv_cache.steady_cpu_kv_bytes(6 * g, 4, d) == 6 * g      # per device count
    assert kv_cache.steady_cpu_kv_bytes(16 * g, 2, d) == 16 * g    # a real change is followed
    assert kv_cache.steady_cpu_kv_bytes(15 * g, 2, d) == 16 * g    # and recorded
    assert kv_cache.steady_cpu_kv_bytes(7 * g, 4, d) == 6 * g
    (tmp_path / kv_cache.CPU_KV_RECORD).write_text("not json")
    assert kv_cache.steady_cpu_kv_bytes(9 * g, 2, d) == 9 * g      # a broken record: replaced
    assert kv_cache.steady_cpu_kv_bytes(10 * g, 2, d) == 9 * g
    assert kv_cache.steady_cpu_kv_bytes(10 * g, 2, None) == 10 * g  # no cache, no record
    # Records this version could not have chosen are not kept; nor one above a floor budget.
    for bad in (0, g + 1, "4"):
        (tmp_path / kv_cache.CPU_KV_RECORD).write_text(json.dumps({"2": bad}))
        assert kv_cache.steady_cpu_kv_bytes(g, 2, d) == g
    assert kv_cache.steady_cpu_kv_bytes(2 * g, 2, d) == g
    (tmp_path / kv_cache.CPU_KV_RECORD).write_text(json.dumps({"2": 2 * g}))
    assert kv_cache.steady_cpu_kv_bytes(g, 2, d) == g
    assert not list(tmp_path.glob("*.tmp"))

    # An engine's resolution keeps its record beside JAX's compilation cache.
    plans = [InstancePlan("prefill", 0, 1, 1, (0,)), InstancePlan("decode", 0, 1, 1, (1,))]
    config = EngineConfig(model="opt-tiny")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    try:
        monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda: 20 * GIB)
        assert with_cpu_kv_budget(config, plans).cpu_kv_cache_bytes == 3 * GIB
        assert (tmp_path / "cache" / kv_cache.CPU_KV_RECORD).exists()
        monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda: int(21.75 * GIB))
        assert kv_cache.auto_cpu_kv_bytes(2) == 3 * GIB + g           # the fresh share moved
        assert with_cpu_kv_budget(config, plans).cpu_kv_cache_bytes == 3 * GIB
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
