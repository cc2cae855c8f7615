"""Admission: refuse early (503 + an honest Retry-After) what would miss a stated multiple of
its SLOs, so every accepted request is served within them.

A request (or a batch of prompts, admitted whole or not at all) is refused when
1. the server is stopping, or the engine failed for good (no Retry-After: retrying this server
   cannot help);
2. more than `max_queue` engine requests would be in flight (a hard cap; a batch larger than the
   cap can never be admitted: 400);
3. its estimated time to first token exceeds `max_ttft` (default: `--slo-multiple` x the TTFT
   SLO), or its estimated time per output token exceeds `max_tpot` (the multiple x the TPOT
   SLO). The estimate comes from both phases' backlogs (load_estimate.py). Retry-After is the
   time the backlog needs to drain to where it would fit.
A request that would miss a bound even on an idle engine is admitted: no waiting makes it
better, and refusing it forever would be worse than serving it late.
"""
from __future__ import annotations

import dataclasses
import math

from serving.api_errors import ApiError
from serving.load_estimate import Estimate, LoadEstimator

DEFAULT_MAX_QUEUE = 8192            # requests admitted and not finished
SLO_MULTIPLE = 4                    # an admitted request's TTFT and TPOT stay within 4 SLOs
DEFAULT_TPOT_SLO = 0.15             # seconds; the paper's OPT-66B chatbot SLO (Table 1)

QUEUE_FULL, TTFT, TPOT = "queue_full", "ttft_slo", "tpot_slo"
SHUTTING_DOWN, ENGINE_FAILED = "shutting_down", "engine_failed"
REJECTION_REASONS = (QUEUE_FULL, TTFT, TPOT, SHUTTING_DOWN, ENGINE_FAILED)
MIN_RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class AdmissionBounds:
    max_queue: int = DEFAULT_MAX_QUEUE
    max_ttft: float = math.inf      # seconds an admitted request may wait for its first token
    max_tpot: float = math.inf      # seconds per output token it may take after the first


class Admission:
    def __init__(self, engine, bounds: AdmissionBounds, on_reject,
                 estimator: LoadEstimator | None = None):
        self.engine = engine
        self.bounds = bounds
        self.on_reject = on_reject          # called with the reason of each rejection
        self.estimator = estimator or LoadEstimator(engine)
        self.accepting = True

    def check(self, in_flight: int, in_flight_rows: int, prompt_lens: list[int], rows: int,
              max_tokens: int) -> Estimate | None:
        """Raise ApiError (503, or 400 for a batch that can never fit) unless prompts of
        `prompt_lens` tokens, `rows` sequences in all of up to `max_tokens` tokens, may be
        admitted beside `in_flight` requests (`in_flight_rows` sequences). Returns the cost
        estimate it admitted them on (None: no bound needs one)."""
        bounds = self.bounds
        if not self.accepting:
            self._reject(SHUTTING_DOWN, "server is shutting down: retry on another server")
        failed = self.engine_failed()
        if failed is not None:
            self.on_reject(ENGINE_FAILED)
            raise failed
        num_requests = len(prompt_lens)
        if num_requests > bounds.max_queue:
            raise ApiError(400, f"a batch of {num_requests} prompts can never be admitted: the "
                                f"server admits at most {bounds.max_queue} requests at once "
                                f"(--max-queue); send fewer prompts per request",
                           param="prompt")
        if in_flight + num_requests > bounds.max_queue:
            self._reject(QUEUE_FULL, f"server is at its admission bound of {bounds.max_queue} "
                                     f"requests in flight: retry later, or start it with a "
                                     f"larger --max-queue")
        if math.isinf(bounds.max_ttft) and math.isinf(bounds.max_tpot):
            return None
        cost = self.estimator.estimate(in_flight_rows, prompt_lens, rows, max_tokens,
                                       bounds.max_ttft, bounds.max_tpot)
        if cost.ttft > max(bounds.max_ttft, cost.ttft_alone):
            self._reject(TTFT, f"server is overloaded: this request would wait about "
                               f"{cost.ttft:.1f} s for its first token, over the bound of "
                               f"{bounds.max_ttft:g} s (--max-queue-delay): retry later",
                         retry_after=cost.ttft_wait)
        if cost.tpot > max(bounds.max_tpot, cost.tpot_alone):
            self._reject(TPOT, f"server is overloaded: this request would take about "
                               f"{cost.tpot:.3f} s per output token, over the bound of "
                               f"{bounds.max_tpot:g} s (--max-tpot): retry later",
                         retry_after=cost.tpot_wait)
        return cost

    def engine_failed(self) -> ApiError | None:
        """503 without Retry-After when the engine can serve no more (no instance left for a
        phase): retrying this server cannot help."""
        health = self.engine.health()
        if health["ok"]:
            return None
        failed = "; ".join(f"{name}: {state}" for name, state in health["instances"].items()
                           if state != "ok")
        return ApiError(503, f"engine failed and cannot serve any more ({failed or 'stopped'}):"
                             f" restart the server")

    def _reject(self, reason: str, message: str, retry_after: float = MIN_RETRY_AFTER_S):
        self.on_reject(reason)
        seconds = max(MIN_RETRY_AFTER_S, math.ceil(retry_after))
        raise ApiError(503, message, {"Retry-After": str(seconds)})
