"""Admission by cost: the policy against a stub estimate, and the estimate against an engine
whose per-instance stats (engine.stats()) the test plays out on a fake clock."""
from __future__ import annotations

import math
import types

import pytest

from serving.admission import (ENGINE_FAILED, QUEUE_FULL, SHUTTING_DOWN, TPOT, TTFT, Admission,
                               AdmissionBounds)
from serving.api_errors import ApiError
from serving.load_estimate import Estimate, LoadEstimator


class FakeEngine:
    """Per-instance stats the test sets; one prefill and one decode instance."""

    def __init__(self, decode_cap=64, prefill_cap=8, ok=True):
        self.config = types.SimpleNamespace(context_max_batch_size=prefill_cap,
                                            decoding_max_batch_size=decode_cap, block_size=16)
        self.prefill = {"instance": "prefill0", "role": "prefill", "waiting": 0,
                        "waiting_tokens": 0, "token_budget": 512, "steps": 0, "busy_s": 0.0,
                        "tokens": 0, "running": 0, "blocks_total": 10_000}
        self.decode = {"instance": "decode0", "role": "decode", "waiting": 0, "running": 0,
                       "steps": 0, "busy_s": 0.0, "tokens": 0, "blocks_total": 10_000}
        self.ok = ok

    def stats(self):
        return [dict(self.prefill), dict(self.decode)]

    def health(self):
        state = "ok" if self.ok else "failed: injected"
        return {"ok": self.ok, "instances": {"prefill0": "ok", "decode0": state}}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def played(engine: FakeEngine, clock: Clock, estimator: LoadEstimator, seconds: float,
           prefill_step=None, decode_rows=0, decode_step=None, prefill_waiting=0,
           prefilled_per_s=None):
    """Advance the fake engine by `seconds` in samples of 50 ms: decode steps of
    `decode_step` s at `decode_rows` rows, prefill steps of `prefill_step` s (each serving
    the waiting queue), prefill emitting `prefilled_per_s` first tokens per second."""
    for _ in range(round(seconds / 0.05)):
        clock.now += 0.05
        if prefill_step:
            engine.prefill["steps"] += max(1, round(0.05 / prefill_step))
            engine.prefill["busy_s"] += 0.05
        if prefilled_per_s is not None:
            engine.prefill["tokens"] += prefilled_per_s * 0.05
        engine.prefill["waiting"] = prefill_waiting
        if decode_step:
            steps = 0.05 / decode_step
            engine.decode["steps"] += steps
            engine.decode["busy_s"] += 0.05
            engine.decode["tokens"] += steps * decode_rows
        engine.decode["running"] = decode_rows
        estimator.sample()


@pytest.fixture
def measured():
    """An estimator that saw decode steps of 10 ms at 16 rows and 40 ms at 64 rows, and
    prefill steps of 10 ms."""
    engine, clock = FakeEngine(), Clock()
    estimator = LoadEstimator(engine, clock)
    played(engine, clock, estimator, 2.0, prefill_step=0.01, decode_rows=16, decode_step=0.01)
    played(engine, clock, estimator, 2.0, prefill_step=0.01, decode_rows=64, decode_step=0.04)
    return engine, clock, estimator


def test_decode_step_time_is_measured_per_batch_bucket_and_extended(measured):
    _, _, estimator = measured
    assert estimator.step_time(16) == pytest.approx(0.01)
    assert estimator.step_time(40) == pytest.approx(0.04)       # the 64-row bucket
    assert estimator.step_time(3) == pytest.approx(0.01)        # below: the smallest seen
    assert estimator.step_time(32) == pytest.approx(0.02)       # between: interpolated
    assert estimator.step_time(128) == pytest.approx(0.08)      # above: along the last two
    one = LoadEstimator(FakeEngine(), Clock())
    played(one.engine, one.clock, one, 1.0, decode_rows=1, decode_step=0.09)
    assert one.step_time(8) == pytest.approx(0.09)              # from one bucket: flat


def test_tpot_grows_with_the_sequences_admitted(measured):
    _, _, estimator = measured
    light = estimator.estimate(10, [64], 1, 16)
    heavy = estimator.estimate(100, [64], 1, 16)    # 101 rows: past the 64-row batch cap
    assert light.tpot == pytest.approx(0.01)
    # 37 rows wait for a slot: 64 rows finish every 40 ms x 16 tokens, so ~0.37 s, spread
    # over 15 gaps, on top of the full batch's 40 ms step.
    assert heavy.tpot == pytest.approx(0.04 + (37 * 0.04 * 16 / 64 - heavy.ttft) / 15, rel=0.01)


def test_short_prompts_behind_short_prompts_cost_one_step_each_batch(measured):
    """The prefill rule is in steps: 30 queued 2-token prompts, 8 per step, are 4 steps, not
    a token rate measured on long prompts (that refused 556 valid 2-token requests)."""
    engine, clock, estimator = measured
    engine.prefill.update(waiting=30, waiting_tokens=60)
    clock.now += 0.05                                           # fresh stats
    assert estimator.estimate(0, [2], 1, 2).ttft == pytest.approx(4 * 0.01)
    engine.prefill.update(waiting=3, waiting_tokens=1200)       # 1,202 tokens: 3 budgets
    clock.now += 0.05
    assert estimator.estimate(0, [2], 1, 2).ttft == pytest.approx(3 * 0.01)


def test_a_prompt_longer_than_the_budget_is_one_step_unless_chunked(measured):
    """Prompts run whole: 15 queued prompts of 512 tokens and this one are 16 steps, not
    16 x 512 / 128 = 64 budgets of 128 tokens. Chunked prefill does split them: 64 steps."""
    engine, clock, estimator = measured
    engine.prefill.update(waiting=15, waiting_tokens=15 * 512, token_budget=128)
    clock.now += 0.05
    assert estimator.estimate(0, [512], 1, 2).ttft == pytest.approx(16 * 0.01)
    engine.prefill.update(role="chunked")
    clock.now += 0.05
    assert estimator.estimate(0, [512], 1, 2).ttft == pytest.approx(64 * 0.01)


def test_prefill_stalled_by_decode_back_pressure_is_bounded_by_its_drain(measured):
    engine, clock, estimator = measured
    # 40 prompts wait but only 5 a second get their first token (held pages free slowly).
    played(engine, clock, estimator, 3.0, prefill_waiting=40, prefilled_per_s=5)
    engine.prefill.update(waiting=40, waiting_tokens=40 * 64)
    clock.now += 0.05
    assert estimator.estimate(0, [64], 1, 16).ttft == pytest.approx(41 / 5, rel=0.05)


def test_nothing_measured_estimates_nothing():
    engine = FakeEngine()
    engine.prefill.update(waiting=10_000, waiting_tokens=10 ** 6)
    estimate = LoadEstimator(engine, Clock()).estimate(10_000, [64], 1, 16)
    assert (estimate.ttft, estimate.tpot) == (0, 0)


def test_the_estimator_learns_the_mean_output_length(measured):
    _, _, estimator = measured
    for _ in range(10):   # requests end after 4 tokens: slots free 4x sooner
        estimator.finished([[0.0, 0.04, 0.08, 0.12]])
    short = estimator.estimate(100, [64], 1, 16)
    assert short.tpot == pytest.approx(0.04 + (37 * 0.04 * 4 / 64 - short.ttft) / 15, rel=0.01)


def test_the_second_tokens_delay_is_learned_and_weighs_on_short_outputs(measured):
    _, _, estimator = measured
    estimator.finished([[0.0, 0.03, 0.04, 0.05]])   # the first gap took 3 steady gaps
    assert estimator.estimate(10, [64], 1, 2).tpot == pytest.approx(0.01 + 2 * 0.01)
    assert estimator.estimate(10, [64], 1, 16).tpot == pytest.approx(0.01 + 2 * 0.01 / 15)


def test_estimates_are_calibrated_by_what_admitted_requests_got(measured):
    """The model misses what it does not see (interpreter and CPU contention, load admitted
    later): recent requests' actual TPOT over its estimate (99th percentile) scales it, their
    actual TTFT less its estimate is added."""
    _, _, estimator = measured
    before = estimator.estimate(10, [64], 1, 16)
    for i in range(128):
        estimator.calibrate(before, ttft=before.model_ttft + 0.3,
                            tpot=before.model_tpot * (3.0 if i == 5 else 2.0))
    after = estimator.estimate(10, [64], 1, 16)
    assert after.tpot == pytest.approx(2.0 * before.tpot)     # one outlier in 128: not the 99th
    assert after.ttft == pytest.approx(before.ttft + 0.3)
    assert (after.model_tpot, after.model_ttft) == pytest.approx((before.tpot, before.ttft))


def test_a_burst_s_misses_stop_counting_once_they_are_old(measured):
    """A burst's requests waited far longer than estimated; a minute later, what the model
    missed then no longer inflates the estimate of a request to an idle server."""
    _, clock, estimator = measured
    before = estimator.estimate(0, [64], 1, 16)
    for _ in range(64):
        estimator.calibrate(before, ttft=before.model_ttft + 8.0, tpot=before.model_tpot * 3)
    burst = estimator.estimate(0, [64], 1, 16)
    assert burst.ttft == pytest.approx(before.ttft + 8.0)
    assert burst.tpot == pytest.approx(3 * before.tpot)
    clock.now += 30.0
    assert estimator.estimate(0, [64], 1, 16).ttft == pytest.approx(before.ttft + 8.0)
    clock.now += 31.0
    later = estimator.estimate(0, [64], 1, 16)
    assert (later.ttft, later.tpot) == pytest.approx((before.ttft, before.tpot))


# ---- the policy ------------------------------------------------------------------------------

class StubEstimator:
    def __init__(self, **fields):
        self.fields = {"ttft": 0.0, "tpot": 0.0, "ttft_alone": 0.0, "tpot_alone": 0.0,
                       "ttft_wait": 0.0, "tpot_wait": 0.0, **fields}
        self.asked = []

    def estimate(self, *args):
        self.asked.append(args)
        return Estimate(**self.fields)

    def finished(self, timestamps):
        pass

    def calibrate(self, estimate, ttft, tpot):
        pass


def policy(engine=None, max_queue=10, max_ttft=2.0, max_tpot=0.4, **estimate):
    rejected = []
    admission = Admission(engine or FakeEngine(), AdmissionBounds(max_queue, max_ttft, max_tpot),
                          rejected.append, StubEstimator(**estimate))
    return admission, rejected


def refusal(admission, *args, status=503) -> ApiError:
    with pytest.raises(ApiError) as caught:
        admission.check(*args)
    assert caught.value.status == status
    return caught.value


def test_admits_within_both_bounds_and_passes_the_whole_batch():
    admission, rejected = policy(ttft=2.0, tpot=0.4)             # at the bounds
    admission.check(3, 5, [10, 20], 4, 16)
    assert rejected == [] and admission.estimator.asked == [(5, [10, 20], 4, 16, 2.0, 0.4)]


@pytest.mark.parametrize("estimate,reason,retry,words", [
    (dict(ttft=5.5, ttft_wait=3.5), TTFT, "4", "about 5.5 s for its first token"),
    (dict(tpot=0.9, tpot_wait=12.2), TPOT, "13", "about 0.900 s per output token"),
], ids=["ttft", "tpot"])
def test_refuses_past_a_bound_with_retry_after_the_drain(estimate, reason, retry, words):
    admission, rejected = policy(**estimate)
    error = refusal(admission, 0, 0, [100], 1, 16)
    assert error.headers["Retry-After"] == retry and words in error.message
    assert rejected == [reason]


def test_a_request_no_waiting_can_help_is_admitted():
    admission, rejected = policy(ttft=5.0, ttft_alone=5.0, tpot=0.9, tpot_alone=0.9)
    admission.check(0, 0, [100_000], 1, 16)
    assert rejected == []


def test_infinite_bounds_refuse_by_count_only():
    admission, rejected = policy(max_queue=2, max_ttft=math.inf, max_tpot=math.inf, ttft=1e9)
    admission.check(1, 1, [10 ** 6], 1, 16)
    assert admission.estimator.asked == []
    error = refusal(admission, 2, 2, [1], 1, 16)
    assert error.headers["Retry-After"] == "1" and "--max-queue" in error.message
    assert rejected == [QUEUE_FULL]


def test_a_batch_larger_than_the_cap_is_400_not_503():
    admission, rejected = policy(max_queue=2)
    error = refusal(admission, 0, 0, [1, 1, 1], 3, 16, status=400)
    assert "can never be admitted" in error.message and rejected == []


def test_a_stopping_server_and_a_failed_engine_refuse_everything():
    admission, rejected = policy()
    admission.accepting = False
    assert "shutting down" in refusal(admission, 0, 0, [1], 1, 1).message
    assert rejected == [SHUTTING_DOWN]
    admission, rejected = policy(engine=FakeEngine(ok=False))
    error = refusal(admission, 0, 0, [1], 1, 1)
    assert "Retry-After" not in error.headers and "restart the server" in error.message
    assert "decode0: failed: injected" in error.message and rejected == [ENGINE_FAILED]
