"""The latency model fitted from the engine's own steps (dsjax.eval.engine_fit): step recovery
from what the engine reports per request, the non-negative fit against SciPy's NNLS, and the
knee interpolation validate_simulator.py reports."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import nnls

from benchmarks.validate_simulator import knee
from dsjax.eval.engine_fit import (decode_steps, fit_engine_coeffs, fit_link,
                                   migration_samples, nonnegative_lstsq, prefill_batches,
                                   trimmed_nonnegative_fit)
from dsjax.eval.latency_model import StepCoeffs


@pytest.mark.parametrize("seed", range(6))
def test_nonnegative_fit_matches_scipy_nnls(seed):
    rng = np.random.default_rng(seed)
    x = np.column_stack([np.ones(40), rng.uniform(0, 500, 40), rng.uniform(1, 64, 40)])
    truth = rng.uniform(-1, 1, 3)   # some terms negative: the constraint binds
    y = x @ truth + rng.normal(0, 0.05, 40)
    ours = np.array(nonnegative_lstsq(x, y))
    reference, _ = nnls(x, y)
    assert np.all(ours >= 0)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-9)


def test_a_few_stalls_do_not_set_the_fit():
    """Calibration steps with a compile-sized stall among them: the trimmed fit recovers the
    generating model (noise 2%), where plain least squares is pulled far off."""
    rng = np.random.default_rng(3)
    batch = rng.integers(1, 32, 200).astype(float)
    x = np.column_stack([np.ones(200), batch * rng.uniform(20, 300, 200), batch])
    truth = np.array([2.0, 0.001, 0.3])
    y = x @ truth * rng.normal(1, 0.02, 200)
    y[rng.choice(200, 6, replace=False)] += 800.0   # six 0.8 s stalls
    plain = np.array(nonnegative_lstsq(x, y))
    trimmed = np.array(trimmed_nonnegative_fit(x, y))
    np.testing.assert_allclose(trimmed, truth, rtol=0.1, atol=0.02)
    assert abs(plain[0] - truth[0]) > 10   # the stalls moved the untrimmed intercept


def test_engine_coeffs_recover_the_generating_step_model():
    rng = np.random.default_rng(0)
    prefill_true, decode_true = (3.0, 0.02, 1e-5), (2.0, 0.0004, 0.35)
    prefills = []
    for _ in range(30):
        lens = rng.integers(4, 256, rng.integers(1, 5)).tolist()
        ms = prefill_true[0] + prefill_true[1] * sum(lens) + prefill_true[2] * sum(n * n for n in lens)
        prefills.append((lens, ms / 1e3))
    decodes = []
    for _ in range(60):
        ctx = rng.integers(8, 300, rng.integers(1, 40)).tolist()
        decodes.append((ctx, (decode_true[0] + decode_true[1] * sum(ctx) + decode_true[2] * len(ctx)) / 1e3))
    fallback = StepCoeffs((9, 9, 9), (9, 9, 9), (9, 9, 9))
    fitted = fit_engine_coeffs(prefills, decodes, fallback)
    np.testing.assert_allclose(fitted.prefill, prefill_true, rtol=1e-6)
    np.testing.assert_allclose(fitted.decode_small, decode_true, rtol=1e-6)
    # Too few steps of a phase: that phase keeps the runner profile's coefficients.
    sparse = fit_engine_coeffs(prefills[:3], decodes, fallback)
    assert sparse.prefill == fallback.prefill


def _result(prompt_len, stamps, begin=None, end=None):
    events = [] if begin is None else [{"event_type": "context_begin", "timestamp": begin},
                                       {"event_type": "context_end", "timestamp": end}]
    return SimpleNamespace(prompt_len=prompt_len, token_timestamps=stamps, lifecycle_events=events)


def test_steps_are_recovered_from_token_stamps_and_context_events():
    # Two requests prefilled together (10.0-10.2), then decoded together every 0.05 s; a third
    # arrives later after an idle gap and decodes alone every 0.03 s.
    a = _result(5, [10.2, 10.25, 10.30], 10.0, 10.2)
    b = _result(7, [10.2, 10.25, 10.30], 10.0, 10.2)
    c = _result(3, [12.0, 12.03], 11.9, 12.0)
    assert sorted(prefill_batches([a, b, c])) == sorted([([5, 7], pytest.approx(0.2)),
                                                          ([3], pytest.approx(0.1))])
    steps = decode_steps([a, b, c])
    # The gap from 10.30 to 12.0 is idle time, not a step; 12.0 -> 12.03 is c's own step.
    assert [(sorted(ctx), round(s, 6)) for ctx, s in steps] == [
        ([6, 8], 0.05), ([7, 9], 0.05), ([4], 0.03)]


def _migrated(prompt_len, stamps, pull):
    r = _result(prompt_len, stamps, stamps[0] - 0.01, stamps[0])
    r.lifecycle_events += [{"event_type": "migration_begin", "timestamp": pull[0]},
                           {"event_type": "migration_end", "timestamp": pull[1]}]
    return r


def test_a_migrated_requests_first_decode_token_is_a_hand_off_not_a_step():
    """In disaggregated mode a request's first token comes from the prefill instance and its
    second from the decode instance: the gap between them holds the pull and is no decode
    step (counted as one, it made steps during pulls look 2-5x the fit). A colocated
    request's second token follows its first on the same instance: a step."""
    alone = _migrated(10, [5.0, 5.009, 5.011, 5.013], pull=(5.001, 5.007))
    assert [(ctx, round(s, 6)) for ctx, s in decode_steps([alone])] == [
        ([12], 0.002), ([13], 0.002)]
    colocated = _result(10, [5.0, 5.002, 5.004], 4.99, 5.0)
    assert [(ctx, round(s, 6)) for ctx, s in decode_steps([colocated])] == [
        ([11], 0.002), ([12], 0.002)]
    # Joining a running request's step: the step counts, timed from that request's last one;
    # and the step during which alone's prefill stamped its first token (4.998 -> 5.005,
    # across 5.0) is timed from the decode step before it, not from that stamp.
    running = _migrated(20, [4.0, 4.998, 5.005, 5.009], pull=(4.001, 4.99))
    steps = decode_steps([alone, running])
    assert [(sorted(c), round(s, 6)) for c, s in steps] == [
        ([22], 0.007), ([11, 23], 0.004), ([12], 0.002), ([13], 0.002)]
    # Alone: only the steps that started while no pull was in flight and no prefill step ran
    # (alone's prefill, 4.99-5.0, holds the start of the first; its pull, 5.001-5.007, that of
    # the step it joined).
    assert [ctx for ctx, _ in decode_steps([alone, running], alone=True)] == [[12], [13]]


def _simulated_workload(seed: int, num: int, max_output: int, gap: float):
    """A step model, requests and Poisson arrivals (mean gap `gap` s) for the simulator to
    play the 'real' engine on."""
    from dsjax.eval.latency_model import LatencyModel
    from dsjax.eval.workloads import TestRequest
    model = LatencyModel("opt-13b", {1: StepCoeffs((10.0, 0.1, 0.0), (5.0, 0.01, 0.5),
                                                   (5.0, 0.01, 0.5))}, {(1, 1): 100_000})
    rng = np.random.default_rng(seed)
    reqs = [TestRequest("", int(rng.integers(20, 400)), int(rng.integers(2, max_output)))
            for _ in range(num)]
    return model, reqs, np.cumsum(rng.exponential(gap, len(reqs))).tolist()


@pytest.mark.parametrize("pull_cost,beside_cost", [(0.0, 0.0), (0.003, 0.0), (0.002, 0.004)])
def test_step_costs_are_recovered_from_what_runs_when_steps_start(pull_cost, beside_cost):
    """A 'real' run whose decode steps take longer while a pull is in flight, or while the
    prefill instance runs a step (the simulator with those settings): the fit recovers both
    from the steps alone, and fits the base model on the steps with neither."""
    from dsjax.eval.engine_fit import engine_latency_model, fit_step_costs
    from dsjax.eval.simulator import Cluster, SimConfig
    model, reqs, arrivals = _simulated_workload(seed=2, num=160, max_output=40, gap=0.03)
    # (A link quick enough that some prefill steps run while no pull is in flight.)
    config = SimConfig(kv_link_bytes_per_s=1e9, kv_link_latency_s=0.002,
                       kv_pull_step_cost_s=pull_cost, decode_cost_beside_prefill_s=beside_cost)
    real = [s.to_result() for s in Cluster(model, config).run(reqs, arrivals)]
    fitted = fit_step_costs(real, model)
    assert fitted == (pytest.approx(pull_cost, abs=2e-4), pytest.approx(beside_cost, abs=2e-4))
    refit = engine_latency_model(real, model).coeffs(1).decode_small
    np.testing.assert_allclose(refit, model.coeffs(1).decode_small, rtol=0.02, atol=0.05)
    assert fit_step_costs(real[:3], model) == (0.0, 0.0)   # too few steps to say


def test_a_real_prefill_batch_is_recovered_as_one_step():
    """The engine stamps one context_begin per prefill step, not per request: prompts that ran
    together come back as one batch of their lengths, not as one-prompt steps of the batch's
    whole duration (which made the fitted prefill intercept several times the real steps)."""
    from dsjax import SamplingParams
    from tests._engine_helpers import get_engine, shutdown_all, wait_idle
    engine = get_engine()
    transfers_before = len(engine.kv_transfers)
    try:
        rng = np.random.default_rng(3)
        prompts = [rng.integers(4, 1000, int(n)).tolist() for n in rng.integers(5, 40, 12)]
        streams = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=2))
                   for p in prompts]
        results = [SimpleNamespace(prompt_len=len(p), lifecycle_events=s.result(
            timeout=120).lifetime_events) for p, s in zip(prompts, streams)]
        wait_idle(engine)
        transfers = list(engine.kv_transfers)[transfers_before:]
        page_bytes = engine.config.block_size * engine.model_config.kv_bytes_per_token(4)
    finally:
        shutdown_all()
    # Each prompt's pages moved once; each transfer alone lies inside its pull's
    # migration_begin..migration_end, which also holds the waits for both instances' steps.
    assert sorted(b for b, _ in transfers) == sorted(
        -(-len(p) // engine.config.block_size) * page_bytes for p in prompts)
    pulls = [ev["migration_end"] - ev["migration_begin"] for ev in (
        {e["event_type"]: e["timestamp"] for e in r.lifecycle_events} for r in results)]
    assert all(s > 0 for _, s in transfers)
    assert max(s for _, s in transfers) <= max(pulls)
    assert sum(s for _, s in transfers) < sum(pulls)
    ends = {next(e["timestamp"] for e in r.lifecycle_events if e["event_type"] == "context_end")
            for r in results}
    batches = prefill_batches(results)
    assert len(batches) == len(ends), "requests of one step carry different context_begin"
    assert sorted(n for lens, _ in batches for n in lens) == sorted(map(len, prompts))
    assert max(len(lens) for lens, _ in batches) > 1, "no two prompts shared a step"


def test_link_fit_recovers_latency_and_bandwidth_from_pulls():
    rng = np.random.default_rng(1)
    kv_per_token, latency, bandwidth = 1024, 0.012, 2e8
    results = []
    for _ in range(40):
        n = int(rng.integers(4, 256))
        begin = float(rng.uniform(0, 100))
        events = [{"event_type": "migration_begin", "timestamp": begin},
                  {"event_type": "migration_end",
                   "timestamp": begin + latency + n * kv_per_token / bandwidth}]
        results.append(SimpleNamespace(prompt_len=n, lifecycle_events=events))
    results.append(SimpleNamespace(prompt_len=9, lifecycle_events=[]))   # never migrated
    samples = migration_samples(results, kv_per_token)
    assert len(samples) == 40
    fitted_latency, fitted_bandwidth = fit_link(samples)
    assert fitted_latency == pytest.approx(latency, rel=1e-6)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=1e-6)
    # Pure latency: the bytes explain nothing, so the bandwidth is unbounded.
    flat = [(b, 0.01) for b, _ in samples]
    assert fit_link(flat) == (pytest.approx(0.01), float("inf"))
    assert fit_link(samples[:3]) == (0.0, float("inf"))


def test_knee_interpolates_where_attainment_crosses_ninety_percent():
    assert knee([(10, 1.0), (20, 0.95), (30, 0.85), (40, 0.2)]) == pytest.approx(25.0)
    assert knee([(10, 0.99), (20, 0.95)]) is None
    assert knee([(10, 0.5), (20, 0.2)]) == 0.0


def test_pull_overhead_is_recovered_from_real_pulls_against_their_simulated_twins():
    """A 'real' run whose every pull pays 7 ms the twin's model leaves out (the simulator with
    that overhead, on the same requests and arrivals): the fit recovers it from the first gaps
    between tokens, and charging it makes the twin's hand-offs the real ones."""
    from dsjax.eval.engine_fit import first_gap, fit_pull_overhead
    from dsjax.eval.simulator import Cluster, SimConfig
    model, reqs, arrivals = _simulated_workload(seed=1, num=40, max_output=30, gap=0.05)

    def run(overhead):
        config = SimConfig(kv_link_bytes_per_s=1e10, kv_link_latency_s=0.002,
                           kv_pull_overhead_s=overhead)
        return [s.to_result() for s in Cluster(model, config).run(reqs, arrivals)]
    real, twin = run(0.007), run(0.0)
    fitted = fit_pull_overhead(real, twin)
    assert fitted == pytest.approx(0.007, abs=0.001)
    charged = run(fitted)
    assert [first_gap(r) for r in charged] == pytest.approx([first_gap(r) for r in real],
                                                            abs=0.0015)
    assert fit_pull_overhead(twin, real) == pytest.approx(-0.007, abs=0.001)  # sign kept
    assert fit_pull_overhead(real[:5], twin[:5]) == 0.0   # too few pulls to say
    with pytest.raises(ValueError):   # runs of other requests cannot be paired
        fit_pull_overhead(real, twin[:-1])
