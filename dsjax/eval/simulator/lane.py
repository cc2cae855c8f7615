"""A continuous-batching decode loop's bookkeeping, advanced one whole step at a time.

Per step the work is O(1) plus the requests that finish: the batch's context sum grows by the
batch size, and finishes come off a heap keyed by the step at which each request is done.
"""
from __future__ import annotations

import heapq

from dsjax.eval.simulator.sim_request import SimRequest


class Lane:
    def __init__(self) -> None:
        self.running: dict[int, SimRequest] = {}   # insertion order: the last is the newest
        self._finish: list[tuple[int, int, int, SimRequest]] = []
        self.step = 0
        self.sum_ctx = 0
        self.step_times: list[float] = []
        self.busy = False
        self.step_end = 0.0   # when the running step ends (while busy)

    def __len__(self) -> int:
        return len(self.running)

    def join(self, req: SimRequest) -> None:
        req.epoch += 1
        req.join_step = self.step
        req.seg_start = len(self.step_times)
        self.running[req.rid] = req
        self.sum_ctx += req.context_len
        heapq.heappush(self._finish, (self.step + req.output_len - req.generated, req.rid, req.epoch, req))

    def leave(self, req: SimRequest) -> None:
        """Take a request out (finished or swapped), crediting the tokens it made here."""
        del self.running[req.rid]
        req.generated += self.step - req.join_step
        self.sum_ctx -= req.context_len
        req.segments.append((self.step_times, req.seg_start, len(self.step_times)))

    def newest(self) -> SimRequest:
        return self.running[next(reversed(self.running))]

    def next_finish_step(self) -> int:
        """A lower bound on the step at which the next running request completes."""
        return self._finish[0][0] if self._finish else 1 << 62

    def run_quiet_steps(self, now: float, horizon: float, a: float, b: float, c: float,
                        limit: int) -> tuple[int, float, float]:
        """Advance up to `limit` steps of cost a + b*ctx + c*batch seconds that change nothing but
        the clock (no request finishes or joins; the caller checks), stopping before `horizon`.
        Returns (steps run, when the last one ended, when the next step would end)."""
        n, ctx, times, k = len(self.running), self.sum_ctx, self.step_times, 0
        end = now + a + b * ctx + c * n
        while k < limit and end < horizon:
            times.append(end)
            ctx += n
            k += 1
            now = end
            end = now + a + b * ctx + c * n
        self.step += k
        self.sum_ctx = ctx
        return k, now, end

    def end_step(self, time: float) -> list[SimRequest]:
        """Every running request made one token at `time`; returns those now complete (removed)."""
        self.step += 1
        self.step_times.append(time)
        self.sum_ctx += len(self.running)
        done = []
        heap = self._finish
        while heap and heap[0][0] <= self.step:
            _, rid, epoch, req = heapq.heappop(heap)
            if req.epoch == epoch and rid in self.running:   # stale after a swap otherwise
                self.leave(req)
                done.append(req)
        return done
