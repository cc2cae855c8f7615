"""A simulated request: its lengths, its progress, and the times the simulator recorded for it."""
from __future__ import annotations

from dsjax.eval.results import RequestResult


class SimRequest:
    __slots__ = ("rid", "arrival", "prompt_len", "output_len", "cached_len", "generated",
                 "prefilled", "picked", "first_token_time", "segments", "events", "join_step",
                 "seg_start", "epoch", "done_time")

    def __init__(self, rid: int, arrival: float, prompt_len: int, output_len: int,
                 cached_len: int = 0):
        self.rid = rid
        self.arrival = arrival
        self.prompt_len = prompt_len
        self.output_len = output_len
        # Prompt tokens the prefix cache supplies (the workload declares its reuse): their KV
        # is neither computed nor moved, and is assumed cached where the request is served.
        self.cached_len = min(cached_len, prompt_len - 1)
        self.generated = 0          # tokens produced so far (the first comes from prefill)
        self.prefilled = self.cached_len   # prompt tokens processed so far (chunked prefill)
        self.picked = False         # its prompt took its KV (chunked prefill)
        self.first_token_time: float | None = None
        # Decode tokens as slices of a lane's step-end times: (times, start, end). Keeps the
        # simulator free of per-token work; timestamps are materialised only for results.
        self.segments: list[tuple[list[float], int, int]] = []
        self.events: list[tuple[float, str]] = [(arrival, "issued")]
        self.join_step = 0
        self.seg_start = 0
        self.epoch = 0
        self.done_time: float | None = None

    @property
    def context_len(self) -> int:
        """KV tokens this request holds once its prompt is processed."""
        return self.prompt_len + self.generated

    def log(self, time: float, event: str) -> None:
        self.events.append((time, event))

    def last_token_time(self) -> float:
        for times, start, end in reversed(self.segments):
            if end > start:
                return times[end - 1]
        return self.first_token_time

    def ttft(self) -> float:
        return self.first_token_time - self.arrival

    def tpot(self) -> float:
        if self.output_len <= 1:
            return 0.0
        return (self.last_token_time() - self.first_token_time) / (self.output_len - 1)

    def token_timestamps(self) -> list[float]:
        stamps = [self.first_token_time]
        for times, start, end in self.segments:
            stamps.extend(times[start:end])
        return stamps

    def to_result(self) -> RequestResult:
        events = [{"timestamp": t, "event_type": e} for t, e in self.events]
        return RequestResult.from_timestamps(self.prompt_len, self.output_len, self.arrival,
                                             self.token_timestamps(), events)


def attainment_of(reqs: list[SimRequest], ttft_slo: float, tpot_slo: float) -> tuple[float, float, float]:
    """(both, TTFT only, TPOT only), as dsjax.eval.results.attainment, without building results."""
    n = len(reqs) or 1
    ttft_ok = [r.ttft() <= ttft_slo for r in reqs]
    tpot_ok = [r.tpot() <= tpot_slo for r in reqs]
    both = sum(a and b for a, b in zip(ttft_ok, tpot_ok))
    return both / n, sum(ttft_ok) / n, sum(tpot_ok) / n
