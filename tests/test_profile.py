"""The profiler (dsjax.eval.profiler) and in-process replay (dsjax.eval.replay) on opt-tiny."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dsjax.eval.workloads import TestRequest
from dsjax.eval.profiler import TINY_GRID, default_tps, fit_all, run_profile
from dsjax.eval.latency_model import load_profile
from dsjax.eval.replay import arrival_offsets, replay
from tests._engine_helpers import get_engine, wait_idle


def test_profile_writes_a_loadable_increasing_profile(tmp_path):
    path = tmp_path / "profile.json"
    lines = []
    run_profile("opt-tiny", "float32", [1], path, TINY_GRID, devices=jax.devices()[:1],
                log=lines.append)
    data = json.loads(path.read_text())
    entry = data["facebook/opt-tiny"]
    assert set(entry["1"]) >= {"prefill", "decoding_smallbs", "decoding_largebs"}
    assert entry["kv_capacity_tokens"]["1x1"] > 0
    assert data["hardware"]["gpu_memory_bytes"] > 0
    assert any("R^2" in line for line in lines)

    model = load_profile(path, "opt-tiny")
    assert model.kv_capacity_tokens(1, 1) == entry["kv_capacity_tokens"]["1x1"]
    # The host's share of a step (packing, dispatch, bookkeeping) is measured and kept apart:
    # positive, and what the simulator adds to every step of every mode.
    over = entry["step_overhead_ms"]
    assert over["base"] >= 0 and over["per_token"] >= 0 and over["base"] + over["per_token"] > 0
    assert model.overhead_ms(1000) == pytest.approx(over["base"] + 1000 * over["per_token"])
    prefill = [model.prefill_ms([n] * b, 1) for n, b in [(4, 1), (32, 1), (64, 2), (256, 4)]]
    decode = [model.decode_ms([c] * b, 1) for c, b in [(8, 1), (64, 4), (256, 32)]]
    # Never decreasing with work. (Not strictly increasing: on a loaded 2-core machine, opt-tiny's
    # step times are mostly fixed cost, and a fit of noisy ones may come out flat.)
    for seq in (prefill, decode):
        assert all(x > 0 for x in seq)
        assert all(a <= b for a, b in zip(seq, seq[1:]))


def test_relative_fit_recovers_exact_coefficients():
    pb = [[n] * b for n in (8, 32, 128) for b in (1, 2, 4)]
    pm = [1 + 0.02 * sum(b) + 1e-5 * sum(x * x for x in b) for b in pb]
    db = [[c] * b for c in (16, 64) for b in (1, 4, 16)]
    dm = [4 + 0.001 * sum(b) + 0.3 * len(b) for b in db]
    co, pf, df = fit_all(pb, pm, db, dm)
    np.testing.assert_allclose(co.prefill, (1, 0.02, 1e-5), rtol=1e-6)
    np.testing.assert_allclose(co.decode_small, (4, 0.001, 0.3), rtol=1e-6)
    assert pf.r2 > 0.999999 and df.max_rel_err < 1e-9
    # A negative least-squares coefficient is clamped at 0 by the relative fit.
    co, _, _ = fit_all(pb, [5 - 0.001 * sum(b) for b in pb], db, dm)
    assert min(co.prefill) >= 0


def test_default_tps_divide_heads_and_fit_devices():
    devices = jax.devices()
    assert default_tps("opt-tiny", devices[:8]) == [1, 2, 4]   # 4 heads
    assert default_tps("opt-tiny", devices[:1]) == [1]


def test_replay_returns_one_result_per_request():
    engine = get_engine()
    reqs = [TestRequest("x", 9, 4), (5, 1), ([10, 11, 12], 3), TestRequest("y", 20, 6)]
    results = replay(engine, reqs, rate=50.0, seed=1, timeout=120)
    assert len(results) == len(reqs)
    assert [(r.prompt_len, r.output_len) for r in results] == [(9, 4), (5, 1), (3, 3), (20, 6)]
    offsets = arrival_offsets(len(reqs), 50.0, 1.0, 1)
    starts = [r.start_time for r in results]
    np.testing.assert_allclose(np.array(starts) - starts[0], offsets, atol=1e-9)
    for r in results:
        assert len(r.token_timestamps) == r.output_len
        assert r.ftl >= 0 and r.tpot >= 0
        assert r.lifecycle_events[0]["event_type"] == "issued"
        assert r.lifecycle_events[0]["timestamp"] == r.start_time
        # sent at its arrival, not before: its prefill cannot start earlier
        began = {e["event_type"]: e["timestamp"] for e in r.lifecycle_events}["context_begin"]
        assert began >= r.start_time
    wait_idle(engine)
