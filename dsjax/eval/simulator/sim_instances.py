"""Models of the disaggregated instances: prefill-only and decode-only (colocated.py has the
instance that runs both phases).

Memory is counted in KV tokens against the instance's capacity (LatencyModel.kv_capacity_tokens).
Every step also pays the profile's host overhead (LatencyModel.overhead_ms), once per step.
Pipeline parallelism: a prefill instance runs its batches through a Pipeline of FIFO stages;
a decode instance runs pp micro-batch lanes, each stepping with the latency of the whole
pipeline, which is exact when the lanes are balanced (they are filled evenly).
Either instance can be drained (drain()) so that it can change role (rebalance.py).
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Protocol

from dsjax.eval.latency_model import LatencyModel
from dsjax.eval.simulator.events import EventLoop
from dsjax.eval.simulator.lane import Lane
from dsjax.eval.simulator.pipeline import Pipeline
from dsjax.eval.simulator.sim_request import SimRequest

MS = 1e-3


def make_room(instance, lane: Lane) -> None:
    """Swap the newest requests of `lane` out until each running request has one more KV slot
    for this step (decode and colocated instances share it: `used`, `capacity`, `swapped`)."""
    while len(lane) > 1 and instance.used + len(lane) > instance.capacity:
        req = lane.newest()
        lane.leave(req)
        instance.used -= req.context_len
        instance.swapped.append(req)
        req.log(instance.loop.now, "swap_out")


def step_coeffs(model: LatencyModel, tp: int, batch: int) -> tuple[float, float, float]:
    """(a, b, c) in seconds of a whole decode step (all pipeline stages) plus its host
    overhead: a + b*sum(ctx) + c*batch."""
    co = model.coeffs(tp)
    a, b, c = co.decode_small if batch < co.bs_threshold else co.decode_large
    over = model.overhead
    return (a + over.base_ms) * MS, (b + over.per_token_ms) * MS, c * MS


@dataclasses.dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp


class Sink(Protocol):
    """What instances tell the cluster."""
    def on_first_token(self, req: SimRequest) -> None: ...
    def on_prefilled(self, req: SimRequest, inst: "PrefillInstance") -> None: ...
    def on_finished(self, req: SimRequest) -> None: ...
    def on_decode_progress(self, inst: "DecodeInstance") -> None: ...
    def on_evicted(self, reqs: list[SimRequest], inst: "DecodeInstance") -> None: ...
    def on_drained(self, inst) -> None: ...


class PrefillInstance:
    """FCFS batching under max batch size, max tokens per batch and KV back-pressure: prompts
    keep their KV here until a decode instance pulls them (release())."""

    def __init__(self, loop: EventLoop, model: LatencyModel, spec: Parallelism, sink: Sink,
                 max_batch: int, max_tokens: int, name: str = "prefill"):
        self.loop, self.model, self.spec, self.sink = loop, model, spec, sink
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.capacity = model.kv_capacity_tokens(spec.tp, spec.pp)
        self.name = name
        self.queue: deque[SimRequest] = deque()
        self.queued_tokens = 0
        self.used = 0
        self.pipeline = Pipeline(spec.pp)
        self.in_flight = 0
        self.busy_s = 0.0            # stage-0 time used so far (the rebalancer's load signal)
        self.wakeup_pending = False
        self.draining = False

    def load(self) -> int:
        return self.queued_tokens

    def submit(self, req: SimRequest) -> None:
        self.queue.append(req)
        self.queued_tokens += req.prompt_len
        self.try_launch()

    def release(self, req: SimRequest) -> None:
        """A decode instance has the KV now: free it and maybe launch a waiting batch."""
        self.used -= req.prompt_len
        self.try_launch()
        self._maybe_drained()

    def drain(self) -> list[SimRequest]:
        """Stop taking prompts; returns the queued ones (not started, no KV) for rerouting.
        The instance is drained once its batches are done and decode has pulled their KV."""
        self.draining = True
        queued = list(self.queue)
        self.queue.clear()
        self.queued_tokens = 0
        self._maybe_drained()
        return queued

    def _maybe_drained(self) -> None:
        if self.draining and self.in_flight == 0 and self.used == 0:
            self.draining = False
            self.sink.on_drained(self)

    def try_launch(self) -> None:
        now = self.loop.now
        if not self.queue or self.wakeup_pending:
            return
        if now < self.pipeline.free_at():
            self.wakeup_pending = True
            self.loop.at(self.pipeline.free_at(), self._wakeup)
            return
        batch, tokens, sum_sq = [], 0, 0
        while self.queue and len(batch) < self.max_batch:
            head = self.queue[0]
            n, fresh = head.prompt_len, head.prompt_len - head.cached_len
            if batch and tokens + fresh > self.max_tokens:
                break
            if self.used + n > self.capacity:
                if not batch and self.used == 0:
                    raise ValueError(f"a {n}-token prompt exceeds the KV capacity ({self.capacity} "
                                     f"tokens) of {self.name} tp={self.spec.tp} pp={self.spec.pp}; "
                                     f"use more GPUs per prefill instance")
                break
            req = self.queue.popleft()
            batch.append(req)
            # A cached prefix is not computed; the fresh tokens still attend to it, which the
            # quadratic term sum(len^2) generalises to len^2 - cached^2.
            tokens += fresh
            sum_sq += n * n - req.cached_len ** 2
            self.used += n
            req.log(now, "context_begin")
        if not batch:
            return
        self.queued_tokens -= tokens
        stage = self.model.prefill_stage_ms(tokens, sum_sq, self.spec.tp, self.spec.pp) * MS
        first = stage + self.model.overhead_ms(tokens) * MS
        self.busy_s += first
        self.in_flight += 1
        self.loop.at(self.pipeline.run(now, first, stage), self._finish, batch)
        self.try_launch()

    def _wakeup(self) -> None:
        self.wakeup_pending = False
        self.try_launch()

    def _finish(self, batch: list[SimRequest]) -> None:
        now = self.loop.now
        self.in_flight -= 1
        for req in batch:
            req.first_token_time = now
            req.generated = 1
            req.prefilled = req.prompt_len
            req.log(now, "context_end")
            self.sink.on_prefilled(req, self)
        self.try_launch()
        self._maybe_drained()


class DecodeInstance:
    """FCFS continuous batching over pp lanes; on KV exhaustion the newest request of the lane
    is swapped out (time not charged) and swapped back in before any new request joins."""

    def __init__(self, loop: EventLoop, model: LatencyModel, spec: Parallelism, sink: Sink,
                 max_batch: int, name: str = "decode", pull_step_cost_s: float = 0.0,
                 beside_prefill_cost_s: float = 0.0,
                 prefill_running: Callable[[], bool] = lambda: False):
        self.loop, self.model, self.spec, self.sink = loop, model, spec, sink
        # A step started while pulls into this instance are in flight, or while a prefill
        # instance runs a step (`prefill_running`), takes this much longer
        # (SimConfig.kv_pull_step_cost_s, decode_cost_beside_prefill_s); the cluster counts
        # the pulls.
        self.pull_step_cost_s = pull_step_cost_s
        self.beside_prefill_cost_s = beside_prefill_cost_s
        self.prefill_running = prefill_running
        self.pulls_in_flight = 0
        self.capacity = model.kv_capacity_tokens(spec.tp, spec.pp)
        self.name = name
        self.lanes = [Lane() for _ in range(spec.pp)]
        self.lane_max = max(1, -(-max_batch // spec.pp))
        self.waiting: deque[SimRequest] = deque()   # KV resident, not yet batched
        self.waiting_tokens = 0
        self.swapped: list[SimRequest] = []         # a stack: the oldest swapped-out on top
        self.used = 0                                # KV tokens resident (running + waiting + incoming)
        self.draining = False

    def free_tokens(self) -> int:
        return self.capacity - self.used

    def step_end_after(self, now: float) -> float:
        """When this instance next handles messages: now if a lane is idle, else when the
        first running step ends."""
        return min((lane.step_end if lane.busy else now) for lane in self.lanes)

    def resident(self) -> int:
        """Requests this instance holds (running, waiting, swapped)."""
        return sum(len(lane) for lane in self.lanes) + len(self.waiting) + len(self.swapped)

    def reserve(self, req: SimRequest) -> None:
        """Blocks for an incoming migration, taken when the pull starts."""
        self.used += req.context_len

    def admit(self, req: SimRequest) -> None:
        """A request whose KV is now here; it joins a lane at that lane's next step."""
        if self.draining:   # a pull that began before the drain: pass it on too
            self._hand_over([req])
            return
        self.waiting.append(req)
        self.waiting_tokens += req.context_len
        req.log(self.loop.now, "decoding_begin")
        for lane in self.lanes:
            if not lane.busy:
                self._start_step(lane)

    def release(self, req: SimRequest) -> None:
        """Another decode instance has pulled an evicted request's KV."""
        self.used -= req.context_len
        self._maybe_drained()

    def drain(self) -> None:
        """Hand every request on to other decode instances: the waiting and swapped ones now,
        the running ones when their lane's current step ends. Their KV stays here (counted in
        `used`) until pulled; then the instance is drained."""
        self.draining = True
        evicted = list(self.waiting)
        self.waiting.clear()
        self.waiting_tokens = 0
        for req in reversed(self.swapped):    # oldest first; their KV comes back from host memory
            self.used += req.context_len
            evicted.append(req)
        self.swapped.clear()
        for lane in self.lanes:
            if not lane.busy:
                evicted.extend(self._evict_lane(lane))
        self._hand_over(evicted)

    def _evict_lane(self, lane: Lane) -> list[SimRequest]:
        reqs = list(lane.running.values())
        for req in reqs:
            lane.leave(req)
        return reqs

    def _hand_over(self, reqs: list[SimRequest]) -> None:
        if reqs:
            self.sink.on_evicted(reqs, self)
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        if self.draining and self.used == 0 and not any(lane.busy for lane in self.lanes):
            self.draining = False
            self.sink.on_drained(self)

    def _fill(self, lane: Lane) -> None:
        if not (self.waiting or self.swapped):
            return
        fewest = min(len(l.running) for l in self.lanes)
        while len(lane) < self.lane_max and len(lane) <= fewest:
            if self.swapped:
                req = self.swapped[-1]
                if self.used + req.context_len + len(lane) + 1 > self.capacity:
                    return   # swapped requests go first, so nothing new joins either
                self.swapped.pop()
                self.used += req.context_len
            elif self.waiting:
                req = self.waiting.popleft()
                self.waiting_tokens -= req.context_len
            else:
                return
            lane.join(req)

    def _start_step(self, lane: Lane) -> None:
        self._fill(lane)
        make_room(self, lane)
        if not lane.running:
            lane.busy = False
            return
        lane.busy = True
        n = len(lane.running)
        # A micro-batch passes pp stages of T/pp each: its step takes the whole T.
        a, b, c = step_coeffs(self.model, self.spec.tp, n)
        if self.pulls_in_flight:
            a += self.pull_step_cost_s
        if self.beside_prefill_cost_s and self.prefill_running():
            a += self.beside_prefill_cost_s
        # Steps that finish no one, need no swap and admit no one, ending before any other event,
        # run right here: most steps, and the heap never sees them.
        quiet = 0 if self.waiting or self.swapped else \
            min(lane.next_finish_step() - lane.step - 1, (self.capacity - self.used) // n - 1)
        k, now, end = lane.run_quiet_steps(self.loop.now, self.loop.next_time(), a, b, c, quiet)
        if k:
            self.used += k * n
            self.loop.now = now
        lane.step_end = end
        self.loop.at(end, self._end_step, lane)

    def _end_step(self, lane: Lane) -> None:
        now = self.loop.now
        self.used += len(lane.running)
        finished = lane.end_step(now)
        for req in finished:
            self.used -= req.context_len
            req.log(now, "decoding_end")
            self.sink.on_finished(req)
        if self.draining:
            lane.busy = False
            self._hand_over(self._evict_lane(lane))
        else:
            self._start_step(lane)
        if finished:
            self.sink.on_decode_progress(self)
