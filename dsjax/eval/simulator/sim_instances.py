"""Models of serving instances: prefill-only, decode-only, and colocated (vLLM or Sarathi chunked).

Memory is counted in KV tokens against the instance's capacity (LatencyModel.kv_capacity_tokens).
Pipeline parallelism: a prefill instance admits a new batch each time its first stage frees and
a batch leaves after pp stage times; a decode instance runs pp micro-batch lanes, each stepping
with the latency of the whole pipeline, which is exact when the lanes are balanced.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Protocol

from dsjax.eval.latency_model import LatencyModel
from dsjax.eval.simulator.events import EventLoop
from dsjax.eval.simulator.lane import Lane
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


@dataclasses.dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp


class Sink(Protocol):
    """What instances tell the cluster."""
    def on_prefilled(self, req: SimRequest, inst: "PrefillInstance") -> None: ...
    def on_finished(self, req: SimRequest) -> None: ...
    def on_decode_progress(self, inst: "DecodeInstance") -> None: ...


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
        self.stage_free_at = 0.0
        self.last_done_at = 0.0
        self.wakeup_pending = False

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

    def try_launch(self) -> None:
        now = self.loop.now
        if not self.queue or self.wakeup_pending:
            return
        if now < self.stage_free_at:
            self.wakeup_pending = True
            self.loop.at(self.stage_free_at, self._wakeup)
            return
        batch, tokens, sum_sq = [], 0, 0
        while self.queue and len(batch) < self.max_batch:
            n = self.queue[0].prompt_len
            if batch and tokens + n > self.max_tokens:
                break
            if self.used + n > self.capacity:
                if not batch and self.used == 0:
                    raise ValueError(f"a {n}-token prompt exceeds the KV capacity ({self.capacity} "
                                     f"tokens) of {self.name} tp={self.spec.tp} pp={self.spec.pp}; "
                                     f"use more GPUs per prefill instance")
                break
            req = self.queue.popleft()
            batch.append(req)
            tokens += n
            sum_sq += n * n
            self.used += n
            req.log(now, "context_begin")
        if not batch:
            return
        self.queued_tokens -= tokens
        stage = self.model.prefill_stage_ms(tokens, sum_sq, self.spec.tp, self.spec.pp) * MS
        self.stage_free_at = now + stage
        done = max(now + self.spec.pp * stage, self.last_done_at + stage)
        self.last_done_at = done
        self.loop.at(done, self._finish, batch)
        self.try_launch()

    def _wakeup(self) -> None:
        self.wakeup_pending = False
        self.try_launch()

    def _finish(self, batch: list[SimRequest]) -> None:
        now = self.loop.now
        for req in batch:
            req.first_token_time = now
            req.generated = 1
            req.prefilled = req.prompt_len
            req.log(now, "context_end")
            self.sink.on_prefilled(req, self)
        self.try_launch()


class DecodeInstance:
    """FCFS continuous batching over pp lanes; on KV exhaustion the newest request of the lane
    is swapped out (time not charged) and swapped back in before any new request joins."""

    def __init__(self, loop: EventLoop, model: LatencyModel, spec: Parallelism, sink: Sink,
                 max_batch: int, name: str = "decode"):
        self.loop, self.model, self.spec, self.sink = loop, model, spec, sink
        self.capacity = model.kv_capacity_tokens(spec.tp, spec.pp)
        self.name = name
        self.lanes = [Lane() for _ in range(spec.pp)]
        self.lane_max = max(1, -(-max_batch // spec.pp))
        self.waiting: deque[SimRequest] = deque()   # KV resident, not yet batched
        self.waiting_tokens = 0
        self.swapped: list[SimRequest] = []         # a stack: the oldest swapped-out on top
        self.used = 0                                # KV tokens resident (running + waiting + incoming)

    def free_tokens(self) -> int:
        return self.capacity - self.used

    def reserve(self, req: SimRequest) -> None:
        """Blocks for an incoming migration, taken when the pull starts."""
        self.used += req.context_len

    def admit(self, req: SimRequest) -> None:
        """A request whose KV is now here; it joins a lane at that lane's next step."""
        self.waiting.append(req)
        self.waiting_tokens += req.context_len
        req.log(self.loop.now, "decoding_begin")
        for lane in self.lanes:
            if not lane.busy:
                self._start_step(lane)

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

    def _make_room(self, lane: Lane) -> None:
        make_room(self, lane)

    def _start_step(self, lane: Lane) -> None:
        self._fill(lane)
        self._make_room(lane)
        if not lane.running:
            lane.busy = False
            return
        lane.busy = True
        loop = self.loop
        n = len(lane.running)
        co = self.model.coeffs(self.spec.tp)
        # A micro-batch passes pp stages of T/pp each: its step takes the whole T.
        a, b, c = co.decode_small if n < co.bs_threshold else co.decode_large
        a, b, c = a * MS, b * MS, c * MS
        # Steps that finish no one, need no swap and admit no one, ending before any other event,
        # run right here: most steps, and the heap never sees them.
        if self.waiting or self.swapped:
            inline = 0
        else:
            inline = min(lane.next_finish_step() - lane.step - 1, (self.capacity - self.used) // n - 1)
        horizon = loop.next_time()
        now, ctx, times, k = loop.now, lane.sum_ctx, lane.step_times, 0
        end = now + a + b * ctx + c * n
        while k < inline and end < horizon:
            times.append(end)
            ctx += n
            k += 1
            now = end
            end = now + a + b * ctx + c * n
        if k:
            lane.step += k
            lane.sum_ctx = ctx
            self.used += k * n
            loop.now = now
        loop.at(end, self._end_step, lane)

    def _end_step(self, lane: Lane) -> None:
        now = self.loop.now
        self.used += len(lane.running)
        finished = lane.end_step(now)
        for req in finished:
            self.used -= req.context_len
            req.log(now, "decoding_end")
            self.sink.on_finished(req)
        self._start_step(lane)
        if finished:
            self.sink.on_decode_progress(self)


class ColocatedInstance:
    """One engine for both phases. chunk_size None: vLLM, a prefill batch (FCFS, max tokens and
    sequences) runs whenever prompts wait and nothing is swapped, decodes otherwise.
    chunk_size N: Sarathi, each iteration holds every running decode plus prompt chunks filling
    the rest of an N-token budget. A mixed iteration costs the decode step plus the prefill
    terms of its chunks (one fixed overhead). PP is not pipelined here (a known gap)."""

    def __init__(self, loop: EventLoop, model: LatencyModel, spec: Parallelism, sink: Sink,
                 max_batch: int, max_tokens: int, chunk_size: int | None = None, name: str = "colocated"):
        self.loop, self.model, self.spec, self.sink = loop, model, spec, sink
        self.max_batch, self.max_tokens, self.chunk_size = max_batch, max_tokens, chunk_size
        self.capacity = model.kv_capacity_tokens(spec.tp, spec.pp)
        self.name = name
        self.lane = Lane()
        self.waiting: deque[SimRequest] = deque()
        self.swapped: list[SimRequest] = []
        self.used = 0

    def load(self) -> int:
        return len(self.waiting) + len(self.lane)

    def submit(self, req: SimRequest) -> None:
        self.waiting.append(req)
        if not self.lane.busy:
            self._iterate()

    def _swap_in(self) -> None:
        while self.swapped and len(self.lane) < self.max_batch:
            req = self.swapped[-1]
            if self.used + req.context_len + len(self.lane) + 1 > self.capacity:
                return
            self.swapped.pop()
            self.used += req.context_len
            self.lane.join(req)

    def _take_prompts(self, budget: int, whole: bool) -> list[tuple[SimRequest, int]]:
        """FCFS prompt pieces within `budget` tokens; a prompt takes its KV when first picked."""
        chunks = []
        for req in self.waiting:
            if budget <= 0 or len(self.lane) + len(chunks) >= self.max_batch:
                break
            left = req.prompt_len - req.prefilled
            if whole and chunks and left > budget:
                break
            if req.prefilled == 0:
                if self.used + req.prompt_len + len(self.lane) > self.capacity:
                    if not chunks and not self.lane.running and self.used == 0:
                        raise ValueError(f"a {req.prompt_len}-token prompt exceeds the KV capacity "
                                         f"({self.capacity} tokens) of {self.name}; use more GPUs")
                    break
                self.used += req.prompt_len
                req.log(self.loop.now, "context_begin")
            take = left if whole else min(left, budget)
            chunks.append((req, take))
            budget -= take
        return chunks

    def _iterate(self) -> None:
        self._swap_in()
        chunks: list[tuple[SimRequest, int]] = []
        if self.chunk_size is None:
            if self.waiting and not self.swapped:
                chunks = self._take_prompts(self.max_tokens, whole=True)
        else:
            chunks = self._take_prompts(self.chunk_size - len(self.lane), whole=False)
        decoding = not chunks or self.chunk_size is not None
        if decoding:
            self._make_room()
        if not chunks and not self.lane.running:
            self.lane.busy = False
            return
        self.lane.busy = True
        tp = self.spec.tp
        ms = self.model.decode_stage_ms(len(self.lane), self.lane.sum_ctx, tp, 1) if decoding else 0.0
        if chunks:
            # Chunk attention reads the prompt so far: sum of n*(2*done + n) generalises sum(len^2).
            tokens = sum(n for _, n in chunks)
            sq = sum(n * (2 * r.prefilled + n) for r, n in chunks)
            prefill = self.model.prefill_stage_ms(tokens, sq, tp, 1)
            ms = ms + prefill - (self.model.coeffs(tp).prefill[0] if ms else 0.0)
        self.loop.at(self.loop.now + ms * MS, self._end_iteration, chunks, decoding)

    def _make_room(self) -> None:
        make_room(self, self.lane)

    def _end_iteration(self, chunks: list[tuple[SimRequest, int]], decoding: bool) -> None:
        now = self.loop.now
        if decoding:
            self.used += len(self.lane)
            for req in self.lane.end_step(now):
                self.used -= req.context_len
                req.log(now, "decoding_end")
                self.sink.on_finished(req)
        for req, n in chunks:
            req.prefilled += n
            if req.prefilled < req.prompt_len:
                continue
            self.waiting.remove(req)
            req.first_token_time = now
            req.generated = 1
            self.used += 1
            req.log(now, "context_end")
            if req.output_len <= 1:
                self.used -= req.context_len
                self.sink.on_finished(req)
            else:
                req.log(now, "decoding_begin")
                self.lane.join(req)
        self._iterate()
