"""The admission policy against a fake engine whose queue-delay estimate the test sets."""
from __future__ import annotations

import pytest

from serving.admission import QUEUE_DELAY, QUEUE_FULL, SHUTTING_DOWN, Admission
from serving.api_errors import ApiError


class FakeEngine:
    """Estimates `per_token` seconds of prefill queue per prompt token already queued."""

    def __init__(self, queued_tokens: int = 0, per_token: float | None = 0.01):
        self.queued_tokens, self.per_token = queued_tokens, per_token
        self.asked: list[int] = []

    def admission_estimate(self, num_prompt_tokens: int) -> float | None:
        self.asked.append(num_prompt_tokens)
        if self.per_token is None:        # nothing measured yet
            return None
        return (self.queued_tokens + num_prompt_tokens) * self.per_token


def policy(engine, max_queue=10, max_queue_delay=2.0):
    rejected = []
    return Admission(engine, max_queue, max_queue_delay, rejected.append), rejected


def refusal(admission, *args) -> ApiError:
    with pytest.raises(ApiError) as caught:
        admission.check(*args)
    assert caught.value.status == 503
    return caught.value


def test_admits_while_the_estimated_wait_is_within_the_delay():
    engine = FakeEngine(queued_tokens=100)            # 1 s of queue
    admission, rejected = policy(engine)
    admission.check(0, 1, 100)                        # 2.0 s: at the bound, admitted
    assert engine.asked == [100] and rejected == []


def test_refuses_past_the_delay_with_retry_after_the_excess():
    admission, rejected = policy(FakeEngine(queued_tokens=450))   # 4.5 s of queue
    error = refusal(admission, 0, 1, 100)             # 5.5 s > 2 s
    assert error.headers["Retry-After"] == "4"        # ceil(5.5 - 2)
    assert "about 5.5 s" in error.message and "--max-queue-delay of 2 s" in error.message
    assert rejected == [QUEUE_DELAY]


def test_a_batch_is_estimated_with_all_its_prompt_tokens():
    engine = FakeEngine()
    admission, _ = policy(engine)
    admission.check(0, 3, 150)
    refusal(admission, 0, 3, 300)                     # 3 s for the batch's last prompt
    assert engine.asked == [150, 300]


def test_without_a_measurement_only_the_hard_cap_applies():
    admission, rejected = policy(FakeEngine(per_token=None), max_queue=2)
    admission.check(1, 1, 10 ** 6)
    error = refusal(admission, 2, 1, 1)
    assert error.headers["Retry-After"] == "1" and "--max-queue" in error.message
    refusal(admission, 0, 3, 1)                       # a batch larger than the room left
    assert rejected == [QUEUE_FULL, QUEUE_FULL]


def test_before_anything_is_measured_only_the_cap_bounds():
    admission, _ = policy(FakeEngine(per_token=None), max_queue=1)
    admission.check(0, 1, 10 ** 6)
    refusal(admission, 1, 1, 1)


def test_a_stopping_server_refuses_everything():
    admission, rejected = policy(FakeEngine())
    admission.accepting = False
    assert "shutting down" in refusal(admission, 0, 1, 1).message
    assert rejected == [SHUTTING_DOWN]
