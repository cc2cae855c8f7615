"""Admission: refuse early (503 + Retry-After) what the engine could not start in time.

A request is admitted only if (1) fewer than `max_queue` requests are in flight, a hard cap, and
(2) the engine's estimate of the seconds until such a request's first token,
`engine.admission_estimate(num_prompt_tokens)` (from its queue and its measured prefill drain
rate; None until it has measured anything), is within `max_queue_delay`. So an accepted
request is not held past max_queue_delay (by default 4x the TTFT SLO) before its prefill; an
overloaded server answers at once instead of queueing hours of work.
"""
from __future__ import annotations

import math

from serving.api_errors import ApiError

DEFAULT_MAX_QUEUE = 8192            # requests admitted and not finished
QUEUE_DELAY_SLO_MULTIPLE = 4        # an admitted request waits at most this many TTFT SLOs

QUEUE_FULL, QUEUE_DELAY, SHUTTING_DOWN = "queue_full", "queue_delay", "shutting_down"
REJECTION_REASONS = (QUEUE_FULL, QUEUE_DELAY, SHUTTING_DOWN)
MIN_RETRY_AFTER_S = 1


class Admission:
    def __init__(self, engine, max_queue: int, max_queue_delay: float, on_reject):
        self.engine = engine
        self.max_queue = max_queue
        self.max_queue_delay = max_queue_delay
        self.on_reject = on_reject          # called with the reason of each rejection
        self.accepting = True

    def estimate(self, num_prompt_tokens: int) -> float | None:
        """Seconds to this request's first token; None until the engine measured its drain."""
        return self.engine.admission_estimate(num_prompt_tokens)

    def check(self, in_flight: int, num_requests: int, num_prompt_tokens: int) -> None:
        """Raise ApiError 503 unless `num_requests` more requests with `num_prompt_tokens`
        prompt tokens in all may be admitted now."""
        if not self.accepting:
            self._reject(SHUTTING_DOWN, "server is shutting down: retry on another server")
        if in_flight + num_requests > self.max_queue:
            self._reject(QUEUE_FULL, f"server is at its admission bound of {self.max_queue} "
                                     f"requests in flight: retry later, or start it with a "
                                     f"larger --max-queue")
        wait = self.estimate(num_prompt_tokens)
        if wait is not None and wait > self.max_queue_delay:
            self._reject(QUEUE_DELAY, f"server is overloaded: this request would wait about "
                                      f"{wait:.1f} s for its first token, over the "
                                      f"--max-queue-delay of {self.max_queue_delay:g} s: retry "
                                      f"later", retry_after=wait - self.max_queue_delay)

    def _reject(self, reason: str, message: str, retry_after: float = MIN_RETRY_AFTER_S):
        self.on_reject(reason)
        seconds = max(MIN_RETRY_AFTER_S, math.ceil(retry_after))
        raise ApiError(503, message, {"Retry-After": str(seconds)})
