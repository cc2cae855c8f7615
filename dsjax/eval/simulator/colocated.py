"""One engine running both phases: vLLM's prefill-prioritised scheduling or Sarathi's chunked
prefill, with pipeline parallelism.

chunk_size None (vLLM): an iteration is a prefill batch (FCFS whole prompts under max tokens and
sequences) whenever prompts wait and nothing is swapped, a decode step otherwise.
chunk_size N (Sarathi): an iteration holds every running decode plus prompt chunks filling the
rest of an N-token budget. A mixed iteration costs the decode step plus the prefill terms of its
chunks (one fixed overhead), an assumption rather than a fit.
Pipeline parallelism: pp micro-batch lanes share one KV pool and one prompt queue and cycle
through a Pipeline of FIFO stages, so a long prefill in one lane delays the others stage by stage.
"""
from __future__ import annotations

from collections import deque

from dsjax.eval.latency_model import LatencyModel
from dsjax.eval.simulator.events import EventLoop
from dsjax.eval.simulator.lane import Lane
from dsjax.eval.simulator.pipeline import Pipeline
from dsjax.eval.simulator.sim_instances import MS, Parallelism, Sink, make_room, step_coeffs
from dsjax.eval.simulator.sim_request import SimRequest


class ColocatedInstance:
    def __init__(self, loop: EventLoop, model: LatencyModel, spec: Parallelism, sink: Sink,
                 max_batch: int, max_tokens: int, chunk_size: int | None = None, name: str = "colocated"):
        self.loop, self.model, self.spec, self.sink = loop, model, spec, sink
        self.max_tokens, self.chunk_size = max_tokens, chunk_size
        self.capacity = model.kv_capacity_tokens(spec.tp, spec.pp)
        self.name = name
        self.lanes = [Lane() for _ in range(spec.pp)]
        self.lane_max = max(1, -(-max_batch // spec.pp))
        self.pipeline = Pipeline(spec.pp)
        self.waiting: deque[SimRequest] = deque()   # prompts not yet fully prefilled, FCFS
        self.in_flight: set[int] = set()            # prompts some lane is prefilling now
        self.swapped: list[SimRequest] = []
        self.used = 0

    def load(self) -> int:
        return len(self.waiting) + sum(len(lane) for lane in self.lanes)

    def submit(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self._wake()

    def _wake(self) -> None:
        for lane in self.lanes:
            if not lane.busy:
                self._iterate(lane)

    def _swap_in(self, lane: Lane) -> None:
        while self.swapped and len(lane) < self.lane_max:
            req = self.swapped[-1]
            if self.used + req.context_len + len(lane) + 1 > self.capacity:
                return
            self.swapped.pop()
            self.used += req.context_len
            lane.join(req)

    def _take_prompts(self, lane: Lane, budget: int, whole: bool) -> list[tuple[SimRequest, int]]:
        """FCFS prompt pieces within `budget` tokens; a prompt takes its KV when first picked."""
        chunks = []
        for req in self.waiting:
            if budget <= 0 or len(lane) + len(chunks) >= self.lane_max:
                break
            if req.rid in self.in_flight:
                continue
            left = req.prompt_len - req.prefilled
            if whole and chunks and left > budget:
                break
            if not req.picked:
                if self.used + req.prompt_len + len(lane) > self.capacity:
                    if not chunks and self.used == 0:
                        raise ValueError(f"a {req.prompt_len}-token prompt exceeds the KV capacity "
                                         f"({self.capacity} tokens) of {self.name}; use more GPUs")
                    break
                req.picked = True
                self.used += req.prompt_len
                req.log(self.loop.now, "context_begin")
            take = left if whole else min(left, budget)
            chunks.append((req, take))
            budget -= take
        return chunks

    def _iterate(self, lane: Lane) -> None:
        now = self.loop.now
        if now < self.pipeline.free_at():   # stage 0 is busy with another lane's micro-batch
            lane.busy = True
            self.loop.at(self.pipeline.free_at(), self._iterate, lane)
            return
        self._swap_in(lane)
        chunks: list[tuple[SimRequest, int]] = []
        if self.chunk_size is None:
            if self.waiting and not self.swapped:
                chunks = self._take_prompts(lane, self.max_tokens, whole=True)
        else:
            chunks = self._take_prompts(lane, self.chunk_size - len(lane), whole=False)
        decoding = not chunks or self.chunk_size is not None
        if decoding:
            make_room(self, lane)
        if not chunks and not lane.running:
            lane.busy = False
            return
        lane.busy = True
        if chunks or self.waiting or self.swapped or self.spec.pp > 1:
            first, rest = self._iteration_times(lane, chunks, decoding)
        else:
            first = rest = self._quiet_steps(lane)
        done = self.pipeline.run(self.loop.now, first, rest)
        self.loop.at(done, self._end_iteration, lane, chunks, decoding)

    def _iteration_times(self, lane: Lane, chunks: list[tuple[SimRequest, int]],
                         decoding: bool) -> tuple[float, float]:
        """(stage-0 time including the host overhead, later stages' time) in seconds."""
        tp, pp = self.spec.tp, self.spec.pp
        ms = self.model.decode_stage_ms(len(lane), lane.sum_ctx, tp, pp) if decoding else 0.0
        tokens = lane.sum_ctx if decoding else 0
        if chunks:
            # Chunk attention reads the prompt so far: sum of n*(2*done + n) generalises sum(len^2).
            num = sum(n for _, n in chunks)
            sq = sum(n * (2 * r.prefilled + n) for r, n in chunks)
            prefill = self.model.prefill_stage_ms(num, sq, tp, pp)
            ms += prefill - (self.model.coeffs(tp).prefill[0] / pp if ms else 0.0)
            tokens += sum(r.prefilled + n for r, n in chunks)
            self.in_flight.update(r.rid for r, _ in chunks)
        return (ms + self.model.overhead_ms(tokens)) * MS, ms * MS

    def _quiet_steps(self, lane: Lane) -> float:
        """Nothing but decoding on one stage: steps that finish no one and need no swap, ending
        before the next event, run here at once (as DecodeInstance does). Returns the time of
        the step left to schedule."""
        n = len(lane)
        a, b, c = step_coeffs(self.model, self.spec.tp, n)
        quiet = min(lane.next_finish_step() - lane.step - 1, (self.capacity - self.used) // n - 1)
        k, now, end = lane.run_quiet_steps(self.loop.now, self.loop.next_time(), a, b, c, quiet)
        if k:
            self.used += k * n
            self.loop.now = now
        return end - now

    def _end_iteration(self, lane: Lane, chunks: list[tuple[SimRequest, int]], decoding: bool) -> None:
        now = self.loop.now
        if decoding:
            self.used += len(lane)
            for req in lane.end_step(now):
                self.used -= req.context_len
                req.log(now, "decoding_end")
                self.sink.on_finished(req)
        for req, n in chunks:
            self.in_flight.discard(req.rid)
            req.prefilled += n
            if req.prefilled < req.prompt_len:
                continue
            self.waiting.remove(req)
            req.first_token_time = now
            req.generated = 1
            self.used += 1
            req.log(now, "context_end")
            self.sink.on_first_token(req)
            if req.output_len <= 1:
                self.used -= req.context_len
                self.sink.on_finished(req)
            else:
                req.log(now, "decoding_begin")
                lane.join(req)
        lane.busy = False
        self._iterate(lane)
        self._wake()
