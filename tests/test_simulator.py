"""Simulator and latency-model tests on hand-checkable cases."""
import json
from pathlib import Path

import numpy as np
import pytest

from dsjax.eval.workloads import Dataset, TestRequest, save_dataset
from dsjax.config import EngineConfig
from dsjax.eval.latency_model import (LatencyModel, StepCoeffs, StepOverhead, fit_decode, fit_overhead,
                                      fit_prefill, load_profile, save_profile, scale_model)
from dsjax.eval.results import load_exp
from dsjax.eval.simulator import Cluster, Parallelism, SimConfig, poisson_arrivals, simulate
from dsjax.eval.simulator.__main__ import main as simulator_main
from dsjax.eval.simulator.pipeline import Pipeline

# Round numbers so every time below can be worked out by hand (ms).
PREFILL = (10.0, 0.1, 0.0)        # 10 + 0.1 * tokens
DECODE = (5.0, 0.01, 1.0)         # 5 + 0.01 * context + 1 * batch
KV_BYTES = 2 * 40 * 5120 * 2      # OPT-13B, FP16: 819,200 bytes per token


def toy_model(capacity: int = 100_000, pp_capacity: dict | None = None) -> LatencyModel:
    kv = {(1, 1): capacity, **(pp_capacity or {})}
    return LatencyModel("opt-13b", {1: StepCoeffs(PREFILL, DECODE, DECODE)}, kv)


def run(model, reqs, arrivals, **config):
    return Cluster(model, SimConfig(**config)).run(reqs, arrivals)


def req(prompt, output):
    return TestRequest("", prompt, output)


def decode_ms(contexts):
    return DECODE[0] + DECODE[1] * sum(contexts) + DECODE[2] * len(contexts)


# ---------------------------------------------------------------- latency model

def test_a100_profile_matches_distserve_coefficients():
    m = load_profile(None, "opt-13b")
    assert m.coeffs(1).prefill[0] == pytest.approx(18.10, abs=0.01)
    # prefill ms = a + b*sum(len) + c*sum(len^2)
    a, b, c = m.coeffs(1).prefill
    assert m.prefill_ms([100, 200], tp=1) == pytest.approx(a + 300 * b + 50_000 * c)
    # decode switches to the large-batch coefficients at the threshold (95)
    small, large = m.coeffs(1).decode_small, m.coeffs(1).decode_large
    assert m.decode_ms([10] * 94, tp=1) == pytest.approx(small[0] + 940 * small[1] + 94 * small[2])
    assert m.decode_ms([10] * 95, tp=1) == pytest.approx(large[0] + 950 * large[1] + 95 * large[2])


def test_pipeline_divides_stage_time_and_charges_prefill_handoff():
    m = toy_model()
    assert m.prefill_ms([100], tp=1, pp=2) == pytest.approx(20.0 / 2 + 1.0)
    assert m.decode_ms([100], tp=1, pp=2) == pytest.approx(decode_ms([100]) / 2)


def test_missing_tp_is_interpolated_between_measured_degrees():
    m = load_profile(None, "opt-66b")           # measured: TP 2, 3, 4, 8
    for field in ("prefill", "decode_small"):
        at = {tp: getattr(m.coeffs(tp), field) for tp in (4, 6, 8)}
        for j in range(3):   # every coefficient sits between its neighbours' values
            lo, hi = sorted((at[4][j], at[8][j]))
            assert lo <= at[6][j] <= hi
    one = load_profile(None, "opt-66b").coeffs(1)
    assert one.prefill[1] > m.coeffs(2).prefill[1]  # one GPU is slower per token than two


def test_kv_capacity_from_csv_else_memory_left_after_weights():
    m = load_profile(None, "opt-13b")
    assert m.kv_capacity_tokens(2, 1) == 163008                     # max_num_tokens.csv
    m66 = load_profile(None, "opt-66b")
    assert m66.kv_capacity_tokens(1, 1) == 0                         # 132 GB of weights on 80 GB
    params = m.config.num_params()
    expected = (3 * 80e9 - 2 * params) // KV_BYTES                   # TP 3 is not in the CSV
    assert m.kv_capacity_tokens(3, 1) == expected


def test_unknown_model_names_the_covered_ones(tmp_path):
    with pytest.raises(ValueError, match="opt-13b"):
        load_profile(None, "opt-175b")


def test_fits_recover_coefficients_and_save_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    batches = [list(rng.integers(1, 1000, size=rng.integers(1, 8))) for _ in range(40)]
    ms = [3.0 + 0.05 * sum(b) + 2e-5 * sum(x * x for x in b) for b in batches]
    assert fit_prefill(batches, ms) == pytest.approx((3.0, 0.05, 2e-5), rel=1e-6)
    dbatches = [list(rng.integers(1, 2000, size=n)) for n in list(range(1, 60)) + list(range(100, 160))]
    dms = [(7.0 if len(b) < 95 else 9.0) + 1e-3 * sum(b) + 0.2 * len(b) for b in dbatches]
    small, large = fit_decode(dbatches, dms)
    assert small == pytest.approx((7.0, 1e-3, 0.2), rel=1e-6)
    assert large == pytest.approx((9.0, 1e-3, 0.2), rel=1e-6)

    path = tmp_path / "prof.json"
    save_profile(path, "opt-13b", {1: StepCoeffs((3.0, 0.05, 2e-5), small, large)},
                 kv_capacity={(1, 1): 1234}, hardware={"gpu": "cpu", "gpu_memory_bytes": 1e9})
    raw = json.loads(path.read_text())
    assert raw["facebook/opt-13b"]["1"]["prefill"] == [3.0, 0.05, 2e-5]   # DistServe's keys
    back = load_profile(path, "opt-13b", kv_csv=tmp_path / "none.csv")
    assert back.kv_capacity_tokens(1, 1) == 1234
    assert back.gpu_memory_bytes == 1e9


# ---------------------------------------------------------------- disaggregated cluster

@pytest.mark.parametrize("latency", [0.0, 0.004])
def test_one_request_token_times_by_hand(latency):
    bw = 1e12
    [r] = run(toy_model(), [req(100, 3)], [0.0], kv_link_bytes_per_s=bw,
              kv_link_latency_s=latency)
    first = (10 + 0.1 * 100) / 1e3
    migrated = first + latency + 100 * KV_BYTES / bw
    second = migrated + decode_ms([101]) / 1e3
    third = second + decode_ms([102]) / 1e3
    assert r.token_timestamps() == pytest.approx([first, second, third])
    result = r.to_result()
    assert result.ftl == pytest.approx(first)
    assert result.tpot == pytest.approx((third - first) / 2)
    events = [e["event_type"] for e in result.lifecycle_events]
    assert events == ["issued", "context_begin", "context_end", "migration_begin", "migration_end",
                      "decoding_begin", "decoding_end"]


def test_a_float32_profile_pulls_float32_kv(tmp_path):
    """A profile names its dtype, and a simulated pull moves KV of that dtype: the CPU
    validation profiles are float32, and their link is fitted from float32 transfers (charged
    at FP16's 2 bytes an element, every pull's byte time came out half the real one)."""
    path = tmp_path / "profile.json"
    save_profile(path, "opt-13b", {1: StepCoeffs(PREFILL, DECODE, DECODE)}, {(1, 1): 100_000},
                 hardware={"dtype": "float32"})
    m = load_profile(path, "opt-13b")
    assert m.kv_bytes_per_token() == 2 * 40 * 5120 * 4
    [r] = run(m, [req(100, 3)], [0.0], kv_link_bytes_per_s=1e9)
    first = (10 + 0.1 * 100) / 1e3
    assert r.token_timestamps()[1] == pytest.approx(
        first + 100 * 2 * KV_BYTES / 1e9 + decode_ms([101]) / 1e3)
    assert load_profile(None, "opt-13b").kv_bytes_per_token() == KV_BYTES   # FP16, unnamed
    cpu = load_profile(Path(__file__).parent.parent / "configs" / "profiles"
                       / "profiler-cpu-opt-125m-validation.distserve.json", "opt-125m")
    assert cpu.kv_bytes_per_token() == 2 * 12 * 768 * 4
    # ...and what the engine fits from it keeps the dtype.
    from dsjax.eval.engine_fit import engine_latency_model
    assert engine_latency_model([], cpu).kv_bytes_per_token() == 2 * 12 * 768 * 4
    save_profile(path, "opt-13b", {1: StepCoeffs(PREFILL, DECODE, DECODE)},
                 hardware={"dtype": "float8_e4m3"})
    with pytest.raises(ValueError, match="names dtype 'float8_e4m3'"):   # not guessed as 2
        load_profile(path, "opt-13b")


def test_two_requests_queue_behind_a_running_batch():
    # The first prompt starts alone at 0 (20 ms); the next two queue behind it.
    reqs, arrivals = [req(100, 1), req(100, 1), req(300, 1)], [0.0, 0.001, 0.002]
    batched = run(toy_model(), reqs, arrivals)
    assert [r.first_token_time for r in batched] == pytest.approx([0.020, 0.070, 0.070])
    one_at_a_time = run(toy_model(), reqs, arrivals, prefill_max_batch=1)
    assert [r.first_token_time for r in one_at_a_time] == pytest.approx([0.020, 0.040, 0.080])
    token_capped = run(toy_model(), reqs, arrivals, prefill_max_tokens=350)
    assert [r.first_token_time for r in token_capped] == pytest.approx([0.020, 0.040, 0.080])


def test_migration_time_is_kv_bytes_over_link_bandwidth():
    reqs = [req(1000, 2)]
    fast = run(toy_model(), reqs, [0.0], kv_link_bytes_per_s=1e15)[0]
    slow = run(toy_model(), reqs, [0.0], kv_link_bytes_per_s=1e9)[0]
    delay = 1000 * KV_BYTES * (1 / 1e9 - 1 / 1e15)
    assert slow.last_token_time() - fast.last_token_time() == pytest.approx(delay, rel=1e-6)
    assert slow.first_token_time == fast.first_token_time   # TTFT does not wait for the transfer


@pytest.mark.parametrize("waits", [False, True])
def test_prefill_back_pressure_holds_kv_until_decode_pulls(waits):
    # Prefill KV fits one prompt: the second prompt waits until the first's KV has left. In
    # DistServe's model that is the end of the transfer; dsjax's prefill instance frees the
    # pages once the export has copied them, before the transfer.
    model = toy_model(capacity=100_000, pp_capacity={(2, 1): 150})
    model.measured[2] = model.measured[1]
    bw = 100 * KV_BYTES / 0.5     # each transfer takes 0.5 s
    out = run(model, [req(100, 2), req(100, 2)], [0.0, 0.0], prefill=Parallelism(2, 1),
              kv_link_bytes_per_s=bw, kv_pull_waits_for_steps=waits)
    assert out[0].first_token_time == pytest.approx(0.020)
    assert out[1].first_token_time == pytest.approx(0.020 + (0.0 if waits else 0.5) + 0.020)


def event_time(r, kind):
    [t] = [t for t, e in r.events if e == kind]
    return t


@pytest.mark.parametrize("waits", [False, True])
def test_a_pull_waits_for_the_prefill_step_running_when_it_asks(waits):
    # One prompt a step: A's prefill ends at 20 ms and B's (300 tokens, 40 ms) starts at once,
    # so the prefill instance answers A's ask only when B's step ends, at 60 ms.
    latency = 0.004
    transfer = latency + 100 * KV_BYTES / 1e12
    a, b = run(toy_model(), [req(100, 3), req(300, 2)], [0.0, 0.0], prefill_max_batch=1,
               kv_link_bytes_per_s=1e12, kv_link_latency_s=latency,
               kv_pull_waits_for_steps=waits)
    assert event_time(a, "migration_begin") == pytest.approx(0.020)
    assert event_time(a, "migration_end") == pytest.approx((0.060 if waits else 0.020) + transfer)
    assert b.first_token_time == pytest.approx(0.060)


@pytest.mark.parametrize("blocked", [False, True])
def test_a_transfer_beside_a_source_step_ends_after_it(blocked):
    # One prompt a step: A's prefill ends at 20 ms, B's (40 ms) runs to 60 ms, when the
    # prefill instance exports A's pages and starts C's (40 ms, to 100 ms). The idle decode
    # instance starts receiving at 60 ms; on a CPU, C's step holds the cores the transfer
    # needs, so it ends only after 100 ms.
    latency = 0.004
    transfer = latency + 100 * KV_BYTES / 1e12
    a, _, c = run(toy_model(), [req(100, 3), req(300, 2), req(300, 2)], [0.0] * 3,
                  prefill_max_batch=1, kv_link_bytes_per_s=1e12, kv_link_latency_s=latency,
                  kv_transfer_waits_for_source_step=blocked)
    assert c.first_token_time == pytest.approx(0.100)
    assert event_time(a, "migration_end") == pytest.approx((0.100 if blocked else 0.060)
                                                           + transfer)


def test_a_transfer_waits_for_the_last_stage_of_a_pipelined_source():
    # The same three prompts on a 2-stage prefill instance: C is still in its last stage when
    # A's transfer starts, though its first stage is free; the transfer ends after C leaves.
    model = toy_model(pp_capacity={(1, 2): 100_000})
    latency = 0.004
    transfer = latency + 100 * KV_BYTES / 1e12

    def three(blocked):
        return run(model, [req(100, 3), req(300, 2), req(300, 2)], [0.0] * 3,
                   prefill=Parallelism(1, 2), prefill_max_batch=1, kv_link_bytes_per_s=1e12,
                   kv_link_latency_s=latency, kv_transfer_waits_for_source_step=blocked)
    a, _, c = three(False)
    starts = event_time(a, "migration_end") - transfer
    assert event_time(c, "context_begin") <= starts < c.first_token_time - 0.030  # C's 1st stage
    a, _, c = three(True)
    assert event_time(a, "migration_end") == pytest.approx(c.first_token_time + transfer)
    with pytest.raises(ValueError, match="kv_pull_waits_for_steps"):
        SimConfig(kv_transfer_waits_for_source_step=True, kv_pull_waits_for_steps=False)


def test_a_pull_waits_for_two_decode_step_ends():
    # A decodes alone; B's prefill ends at 50 ms, during one of A's steps. The decode instance
    # asks at that step's end and starts receiving at the end of the step after it.
    latency = 0.004
    transfer = latency + 100 * KV_BYTES / 1e12
    a, b = run(toy_model(), [req(100, 30), req(100, 2)], [0.0, 0.030],
               kv_link_bytes_per_s=1e12, kv_link_latency_s=latency)
    steps = a.token_timestamps()[1:]          # A's decode step ends
    assert event_time(b, "migration_begin") == pytest.approx(0.050)
    asked = next(i for i, t in enumerate(steps) if t >= 0.050)
    assert steps[asked] > 0.050                # the ask came mid-step
    assert event_time(b, "migration_end") == pytest.approx(steps[asked + 1] + transfer)


def test_swap_out_when_decode_kv_runs_out():
    # 250 KV tokens: two 100-token prompts fit, but not both growing 40 tokens more.
    model = toy_model(capacity=250)
    out = run(model, [req(100, 41), req(100, 41)], [0.0, 0.001], kv_link_bytes_per_s=1e15)
    swapped = [r for r in out if any(e == "swap_out" for _, e in r.events)]
    assert [r.rid for r in swapped] == [1]                       # the newest goes
    for r in out:
        assert len(r.token_timestamps()) == r.output_len          # every token still produced
    # The swapped request resumes only after the first one finishes and frees its KV.
    resumed = [t for t in out[1].token_timestamps() if t > out[0].last_token_time()]
    assert resumed and len(resumed) < out[1].output_len - 1


def test_decode_pipeline_lanes_step_with_full_pipeline_latency():
    model = toy_model(pp_capacity={(1, 2): 100_000})
    [r] = run(model, [req(100, 2)], [0.0], decode=Parallelism(1, 2), kv_link_bytes_per_s=1e18)
    assert r.last_token_time() - r.first_token_time == pytest.approx(decode_ms([101]) / 1e3)


def test_unservable_prompt_names_the_instance():
    with pytest.raises(ValueError, match="KV capacity"):
        run(toy_model(capacity=50), [req(100, 2)], [0.0])


# ---------------------------------------------------------------- colocated and chunked

def test_colocated_runs_prefill_then_decodes():
    [r] = run(toy_model(), [req(100, 3)], [0.0], mode="colocated")
    first = 0.020
    assert r.token_timestamps() == pytest.approx(
        [first, first + decode_ms([101]) / 1e3, first + (decode_ms([101]) + decode_ms([102])) / 1e3])


def test_colocated_prefill_preempts_running_decodes():
    out = run(toy_model(), [req(100, 50), req(100, 2)], [0.0, 0.1], mode="colocated")
    stamps = out[0].token_timestamps()
    gaps = np.diff(stamps)
    # Request 0 makes no token while request 1's 20 ms prefill runs: that prefill ends inside
    # request 0's longest gap, which is at least 20 ms longer than a lone decode step.
    i = int(np.argmax(gaps))
    assert stamps[i] < out[1].first_token_time < stamps[i + 1]
    assert gaps[i] >= gaps.min() + 0.020


def test_chunked_prefill_splits_a_long_prompt_by_the_token_budget():
    [r] = run(toy_model(), [req(1000, 2)], [0.0], mode="chunked", chunk_size=512)
    # Chunks of 512 and 488 tokens: 10 + 51.2 ms, then 10 + 48.8 ms.
    assert r.first_token_time == pytest.approx(0.0612 + 0.0588)


# ---------------------------------------------------------------- arrivals, determinism, CLI

def test_poisson_arrivals_have_the_requested_rate_and_are_seeded():
    a = poisson_arrivals(20_000, rate=4.0, seed=3)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.mean(np.diff(a)) == pytest.approx(0.25, rel=0.03)
    assert np.array_equal(a, poisson_arrivals(20_000, 4.0, seed=3))
    bursty = np.diff(poisson_arrivals(20_000, 4.0, seed=3, cv=2.0))
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(2.0, rel=0.1)


def test_simulation_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    reqs = [req(int(p), int(o)) for p, o in zip(rng.integers(4, 1500, 200), rng.integers(2, 300, 200))]
    model = load_profile(None, "opt-13b")
    cfg = SimConfig(prefill=Parallelism(2, 1), num_decode=2)
    stamps = lambda seed: [r.token_timestamps() for r in simulate(model, reqs, 6.0, cfg, seed=seed)]
    assert stamps(1) == stamps(1)
    assert stamps(1) != stamps(2)


def test_cli_writes_an_exp_file(tmp_path, capsys):
    data = tmp_path / "tiny.json"
    save_dataset(Dataset("tiny", [req(50 + 10 * i, 5 + i) for i in range(20)]), data)
    exp = tmp_path / "distserve-20-2.exp"
    assert simulator_main(["--dataset", str(data), "--rate", "2", "--num-prompts", "20",
                           "--ttft-slo", "1", "--tpot-slo", "1", "--exp-out", str(exp)]) == 0
    results = load_exp(exp)
    assert len(results) == 20
    assert all(len(r.token_timestamps) == r.output_len for r in results)
    assert "SLO attainment: both 100.0%" in capsys.readouterr().out


# ---------------------------------------------------------------- host overhead per step

OVERHEAD = StepOverhead(2.0, 0.001)     # 2 ms + 0.001 ms per context token


def test_overhead_is_charged_once_per_step_in_every_mode():
    model = toy_model().with_overhead(OVERHEAD)
    first = (10 + 0.1 * 100 + 2 + 0.001 * 100) / 1e3
    step = lambda ctx: (decode_ms([ctx]) + 2 + 0.001 * ctx) / 1e3
    [r] = run(model, [req(100, 3)], [0.0], kv_link_bytes_per_s=1e18)
    assert r.token_timestamps() == pytest.approx([first, first + step(101), first + step(101) + step(102)])
    [c] = run(model, [req(100, 3)], [0.0], mode="colocated")
    assert c.token_timestamps() == pytest.approx(r.token_timestamps())


def test_fit_overhead_recovers_the_terms_and_keeps_them_non_negative():
    tokens = [0, 500, 1000, 4000, 20000]
    got = fit_overhead(tokens, [2 + 1e-4 * t for t in tokens])
    assert (got.base_ms, got.per_token_ms) == pytest.approx((2.0, 1e-4))
    flat = fit_overhead([100, 200, 300], [3.0, 2.9, 2.8])          # slope < 0: a constant
    assert (flat.base_ms, flat.per_token_ms) == pytest.approx((2.9, 0.0))
    proportional = fit_overhead([100, 200, 300], [0.1, 0.3, 0.5])  # base < 0: through zero
    assert proportional.base_ms == 0.0
    assert proportional.per_token_ms == pytest.approx(np.dot([100, 200, 300], [0.1, 0.3, 0.5]) / 140_000)
    with pytest.raises(ValueError, match="at least 2"):
        fit_overhead([1], [1.0])


def test_overhead_round_trips_through_the_profile_and_defaults_to_none(tmp_path):
    path = tmp_path / "prof.json"
    save_profile(path, "opt-13b", {1: StepCoeffs(PREFILL, DECODE, DECODE)}, overhead=OVERHEAD)
    assert json.loads(path.read_text())["facebook/opt-13b"]["step_overhead_ms"] == \
        {"base": 2.0, "per_token": 0.001}
    assert load_profile(path, "opt-13b").overhead == OVERHEAD
    assert load_profile(None, "opt-13b").overhead == StepOverhead()      # DistServe's A100 file
    assert StepOverhead.parse("2,0.0001") == StepOverhead(2.0, 0.0001)
    with pytest.raises(ValueError, match="BASE_MS,PER_TOKEN_MS"):
        StepOverhead.parse("2")


# ---------------------------------------------------------------- pipelines

def test_pipeline_stages_are_fifo_queues():
    p = Pipeline(2)
    assert p.run(0.0, 3.0, 2.0) == 5.0      # stage 0 [0, 3], stage 1 [3, 5]
    assert p.run(0.0, 1.0, 1.0) == 6.0      # stage 0 [3, 4], stage 1 waits for [5, 6]
    assert p.free_at() == 4.0


def test_colocated_pipeline_lanes_stall_behind_a_prefill_stage_by_stage():
    # PP 2: a stage takes half the step (prefill: plus 1 ms hand-off). By hand (ms): r0's
    # prefill holds stage 0 [0, 11] and stage 1 [11, 22]; r1 (arrived at 5) waits for stage 0,
    # prefills [11, 22] and [22, 33]; r0's first decode step (3.505 per stage) takes stage 0
    # at 22 but waits for stage 1 until 33: its token comes at 36.505, not 29.01.
    model = toy_model(pp_capacity={(1, 2): 100_000})
    r0, r1 = run(model, [req(100, 3), req(100, 2)], [0.0, 0.005], mode="colocated",
                 prefill=Parallelism(1, 2))
    assert r0.token_timestamps() == pytest.approx([0.022, 0.036505, 0.043525])
    assert r1.token_timestamps() == pytest.approx([0.033, 0.04001])


def test_simulator_reads_the_pull_policy_from_the_engine_config():
    assert SimConfig().decode_waiting_share == EngineConfig().decoding_waiting_share


# ---------------------------------------------------------------- OPT-175B from two measured sizes

def test_scaled_profile_grows_with_size_between_no_gain_and_flops():
    m13, m66 = load_profile(None, "opt-13b"), load_profile(None, "opt-66b")
    m175 = scale_model(m66, m13, "opt-175b")
    flops = m175.config.num_params() / m66.config.num_params()       # about 2.6
    for tp in (4, 8):
        for ratio in (m175.prefill_ms([512], tp) / m66.prefill_ms([512], tp),
                      m175.decode_ms([700] * 32, tp) / m66.decode_ms([700] * 32, tp)):
            assert 1.5 < ratio < flops
    assert m175.kv_capacity_tokens(3, 3) == 76192                    # max_num_tokens.csv
    # The exponent is the one that maps OPT-13B onto OPT-66B at the degrees both measured.
    back = scale_model(m13, m66, "opt-66b")
    logs = [np.log(back.prefill_ms([n], tp) / m66.prefill_ms([n], tp))
            for tp in (2, 4) for n in (128, 512, 1024, 2048)]
    assert np.mean(logs) == pytest.approx(0.0, abs=1e-9)


def test_a_cached_prefix_is_neither_computed_nor_moved():
    """A request declaring 96 cached prompt tokens (of 100): prefill charges the 4 fresh ones,
    migration moves only the KV beyond the prefix; chunked prefill starts after it."""
    from dsjax.eval.reuse import ReusedRequest
    bw = 1e12
    cached = ReusedRequest("", 100, 3, 96)
    [r] = run(toy_model(), [cached], [0.0], kv_link_bytes_per_s=bw)
    first = (10 + 0.1 * 4) / 1e3
    migrated = first + (100 - 96) * KV_BYTES / bw
    assert r.token_timestamps()[:2] == pytest.approx([first, migrated + decode_ms([101]) / 1e3])
    [c] = run(toy_model(), [ReusedRequest("", 1000, 2, 512)], [0.0], mode="chunked",
              chunk_size=512)
    assert c.first_token_time == pytest.approx((10 + 0.1 * 488) / 1e3)
