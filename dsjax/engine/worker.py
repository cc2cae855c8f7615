"""Instance loops: each instance is a thread driving one ModelRunner with its scheduler.

Threads share the engine's lock for all host-side state (queues, block tables, request status);
device work runs outside the lock so prefill and decode instances overlap on their devices.
"""
from __future__ import annotations

import logging
import threading
import time

import jax

from dsjax.engine.block_manager import BlockManager
from dsjax.engine.request import Request, Status
from dsjax.executor.runner import ModelRunner, StepOutput
from dsjax.engine.scheduler import BatchLimits, ChunkedScheduler, DecodeScheduler, PrefillScheduler
from dsjax.executor.kv_migration import migrate

log = logging.getLogger("dsjax")


class HostSwapSpace:
    """Host copies of swapped-out pages, per host block id (numpy, one array per stage)."""

    def __init__(self):
        self.pages: dict[str, list] = {}

    def store(self, request_id: str, per_stage_host) -> None:
        self.pages[request_id] = per_stage_host

    def take(self, request_id: str):
        return self.pages.pop(request_id)

    def drop(self, request_id: str) -> None:
        self.pages.pop(request_id, None)


class Instance(threading.Thread):
    """Common loop, stats and bookkeeping; subclasses implement step() -> bool (did work)."""

    def __init__(self, engine, runner: ModelRunner, blocks: BlockManager):
        super().__init__(name=runner.spec.name, daemon=True)
        self.engine = engine
        self.runner = runner
        self.blocks = blocks
        self.lock = engine.lock
        self.wakeup = threading.Event()
        self.paused = threading.Event()  # tests hold an instance still to observe a stage
        self.stopped = False
        self.tokens_since_status = 0
        self.steps = 0
        self.busy_s = 0.0  # wall time of steps that did work
        self.error: BaseException | None = None

    @property
    def name_(self) -> str:
        return self.runner.spec.name

    def run(self) -> None:
        while not self.stopped:
            if self.paused.is_set():
                self.wakeup.wait(0.01)
                continue
            try:
                start = time.perf_counter()
                did_work = self.step()
            except BaseException as e:  # surface to callers instead of dying silently
                log.exception("instance %s failed", self.name_)
                self.error = e
                self.engine.fail_all(e)
                return
            if did_work:
                self.steps += 1
                self.busy_s += time.perf_counter() - start
            else:
                self.wakeup.wait(0.05)
                self.wakeup.clear()

    def stop(self) -> None:
        self.stopped = True
        self.wakeup.set()

    def counts(self) -> dict:
        raise NotImplementedError

    def status(self, elapsed: float) -> str:
        c = self.counts()
        rate = self.tokens_since_status / max(elapsed, 1e-9)
        self.tokens_since_status = 0
        return (f"[{self.name_}] running {c['running']} | waiting {c['waiting']} | swapped "
                f"{c['swapped']} | KV blocks {self.blocks.num_used}/{self.blocks.num_total} | "
                f"{rate:.1f} tokens/s")

    # Shared by subclasses -----------------------------------------------------------------------

    def _emit_tokens(self, requests, out: StepOutput, rows=None) -> list[Request]:
        """Append each row's sampled token; returns the requests that finished. Lock held."""
        finished = []
        now = time.perf_counter()
        for i, req in enumerate(requests):
            row = i if rows is None else rows[i]
            if req.finished:
                continue
            logprobs = None
            if req.output_logprobs is not None:
                n = req.sampling_params.logprobs
                logprobs = {int(t): float(l) for t, l in
                            zip(out.top_ids[row][:n], out.top_logprobs[row][:n])}
                logprobs[int(out.tokens[row])] = float(out.logprob[row])
            if self.engine.record_token(req, int(out.tokens[row]), logprobs, now):
                finished.append(req)
        self.engine.publish(requests)
        self.tokens_since_status += len(requests)
        return finished

    def _start_prefill(self, batch) -> list[list[int]]:
        """Mark a scheduled prompt batch as running; returns its block tables. Lock held."""
        for r in batch:
            r.status = Status.PREFILLING
            r.add_event("context_begin")
        self.in_flight = batch
        return [list(self.blocks.tables[r.request_id]) for r in batch]

    def _finish_prefill(self, batch, out: StepOutput, hand_off) -> None:
        """Stream first tokens; free finished or aborted requests, hand_off(r) the rest. Lock held."""
        self.in_flight = []
        self._emit_tokens(batch, out)
        for r in batch:
            r.add_event("context_end")
            if r.finished:
                self.blocks.free(r.request_id)
            else:
                hand_off(r)


class PrefillInstance(Instance):
    """Runs prompt batches; prefilled requests keep their blocks until a decode instance pulls."""

    def __init__(self, engine, runner, blocks, limits: BatchLimits):
        super().__init__(engine, runner, blocks)
        self.scheduler = PrefillScheduler(limits, blocks)
        self.in_flight: list[Request] = []

    def load(self) -> int:
        return self.scheduler.num_waiting_tokens + sum(r.prompt_len for r in self.in_flight)

    def admit(self, request: Request) -> None:
        self.scheduler.add(request)
        self.wakeup.set()

    def remove_queued(self, request: Request) -> bool:
        return self.scheduler.remove(request)

    def counts(self):
        held = sum(1 for r in self.engine.migration_queue if r.prefill_instance is self)
        return {"running": len(self.in_flight), "waiting": len(self.scheduler.waiting),
                "swapped": 0, "held": held}

    def step(self) -> bool:
        with self.lock:
            batch = self.scheduler.schedule()
            if not batch:
                return False
            tables = self._start_prefill(batch)
        out = self.runner.prefill(batch, tables)
        with self.lock:
            self._finish_prefill(batch, out, self._await_migration)
        self.engine.wake_decoders()
        return True

    def _await_migration(self, r: Request) -> None:
        r.status = Status.WAITING_MIGRATION
        r.prefill_instance = self
        self.engine.migration_queue.append(r)

    def release(self, request: Request) -> None:
        """Free a request's prefill blocks (after migration or abort). Lock held."""
        self.blocks.free(request.request_id)
        self.wakeup.set()


class DecodeMixin:
    """Decode-step machinery shared by decode, colocated and chunked instances."""

    num_swap_outs = 0
    # Benchmarks set a list here to get (batch size, step seconds, device-wait seconds) per
    # decode step (pulls excluded).
    step_log: list | None = None

    def _claim_swaps(self, step) -> list:
        """Status changes and host pages of the scheduler's swaps, under the lock (an abort
        or a stop string may land while the pages move). Returns the pages to bring back."""
        self.num_swap_outs += len(step.swap_out)
        for r in step.swap_out:
            r.status = Status.SWAPPED
        pages_in = []
        for r in step.swap_in:
            r.status = Status.DECODING
            pages_in.append(self.swap_space.take(r.request_id))
        return pages_in

    def _move_swapped_pages(self, step, pages_in) -> None:
        """Device work of the swaps (no lock): victims' pages to host, returning ones back."""
        if not step.swap_out and not step.swap_in:
            return
        gathered = [(r, self.runner.gather_pages(step.swap_out_blocks[r.request_id]))
                    for r in step.swap_out]
        host = jax.device_get([pages for _, pages in gathered])  # one sync for all victims
        for r, pages in zip(step.swap_in, pages_in):
            self.runner.insert_pages(step.swap_in_blocks[r.request_id], pages)
        with self.lock:
            for (r, _), pages in zip(gathered, host):
                if not r.finished:  # an abort meanwhile already freed its host blocks
                    self.swap_space.store(r.request_id, pages)

    def _decode_step(self) -> bool:
        """One continuous-batching step of self.scheduler; False if there was nothing to do."""
        start = time.perf_counter()
        with self.lock:
            step = self.scheduler.schedule()
            batch = step.batch
            if not batch and not step.swap_out:
                return False
            tables = [list(self.blocks.tables[r.request_id]) for r in batch]
            for r in batch:
                if len(r.output_token_ids) == 1 and r.events[-1]["event_type"] != "decoding_begin":
                    r.add_event("decoding_begin")
            pages_in = self._claim_swaps(step)
        self._move_swapped_pages(step, pages_in)
        if not batch:
            return True
        out = self.runner.decode(batch, tables)
        with self.lock:
            finished = self._emit_tokens(batch, out)
            self._finish_decoded(self.scheduler, finished)
        if self.step_log is not None:
            self.step_log.append((len(batch), time.perf_counter() - start, self.runner.last_wait_s))
        return True

    def _finish_decoded(self, scheduler, finished) -> None:
        for r in finished:
            if scheduler.remove(r) or self.blocks.holds(r.request_id):
                self.blocks.free(r.request_id)
            self.swap_space.drop(r.request_id)


class DecodeInstance(DecodeMixin, Instance):
    """Pulls prefilled requests (KV device to device), then decodes with continuous batching."""

    def __init__(self, engine, runner, blocks, limits: BatchLimits):
        super().__init__(engine, runner, blocks)
        self.scheduler = DecodeScheduler(limits, blocks)
        self.swap_space = HostSwapSpace()

    def load(self) -> int:
        return len(self.scheduler)

    def counts(self):
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "swapped": len(s.swapped)}

    def _pull(self) -> bool:
        """Pull prefilled requests (FCFS) while this instance has room for them: start every
        copy, wait for the device once, then free the prefill blocks."""
        moving = []
        while True:
            with self.lock:
                queue = self.engine.migration_queue
                if not queue or not self.scheduler.can_pull(queue[0].num_tokens):
                    break
                req = queue.popleft()
                req.status = Status.MIGRATING
                req.add_event("migration_begin")
                began = req.events[-1]["timestamp"]
                src_blocks = list(req.prefill_instance.blocks.tables[req.request_id])
                dst_blocks = self.blocks.allocate(req.request_id, req.prompt_len)
            nbytes = migrate(req.prefill_instance.runner, src_blocks, self.runner, dst_blocks)
            moving.append((req, nbytes, began))
        if not moving:
            return False
        self.runner.block_until_ready()
        with self.lock:
            for req, nbytes, began in moving:
                req.prefill_instance.release(req)
                req.add_event("migration_end")
                self.engine.record_migration(nbytes, req.events[-1]["timestamp"] - began)
                if req.finished:
                    self.blocks.free(req.request_id)
                else:
                    req.status = Status.DECODING
                    self.scheduler.add_waiting(req)
        return True

    def step(self) -> bool:
        pulled = self._pull()
        return self._decode_step() or pulled


class ColocatedInstance(DecodeMixin, Instance):
    """vLLM-style baseline: one instance, continuous batching, a waiting prompt batch runs first."""

    def __init__(self, engine, runner, blocks, prefill_limits: BatchLimits,
                 decode_limits: BatchLimits):
        super().__init__(engine, runner, blocks)
        self.prefill = PrefillScheduler(prefill_limits, blocks)
        self.scheduler = DecodeScheduler(decode_limits, blocks)
        self.swap_space = HostSwapSpace()
        self.in_flight: list[Request] = []

    def load(self) -> int:
        return len(self.prefill.waiting) + len(self.scheduler)

    def admit(self, request: Request) -> None:
        self.prefill.add(request)
        self.wakeup.set()

    def remove_queued(self, request: Request) -> bool:
        return self.prefill.remove(request)

    def counts(self):
        s = self.scheduler
        return {"running": len(s.running) + len(self.in_flight),
                "waiting": len(self.prefill.waiting) + len(s.waiting), "swapped": len(s.swapped)}

    def step(self) -> bool:
        with self.lock:
            batch = []
            room = self.scheduler.limits.max_batch_size - len(self.scheduler)
            # Prompts first (vLLM's policy), unless requests are swapped out; keep a block per
            # running request in reserve so admitting prompts does not force a swap at once.
            if not self.scheduler.swapped and room > 0 and \
                    self.blocks.num_free > len(self.scheduler.running):
                batch = self.prefill.schedule(max_batch_size=min(
                    room, self.prefill.limits.max_batch_size))
            if batch:
                tables = self._start_prefill(batch)
        if not batch:
            return self._decode_step()
        out = self.runner.prefill(batch, tables)
        with self.lock:
            self._finish_prefill(batch, out, self._start_decoding)
        return True

    def _start_decoding(self, r: Request) -> None:
        r.status = Status.DECODING
        self.scheduler.add_waiting(r)


class ChunkedInstance(DecodeMixin, Instance):
    """Sarathi-style: each step decodes every running request and fills the rest of a token
    budget with prompt chunks."""

    def __init__(self, engine, runner, blocks, limits: BatchLimits):
        super().__init__(engine, runner, blocks)
        self.chunked = ChunkedScheduler(limits, blocks)
        self.scheduler = self.chunked.decode
        self.swap_space = HostSwapSpace()

    def load(self) -> int:
        return len(self.chunked)

    def admit(self, request: Request) -> None:
        self.chunked.add(request)
        self.wakeup.set()

    def remove_queued(self, request: Request) -> bool:
        # A prompt partly computed holds blocks: remove() drops it, the caller frees them.
        return self.chunked.remove(request)

    def counts(self):
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(self.chunked.prefilling) + len(s.waiting),
                "swapped": len(s.swapped)}

    def step(self) -> bool:
        with self.lock:
            step = self.chunked.schedule()
            rows = [(r, list(self.blocks.tables[r.request_id]), r.num_tokens - 1, 1)
                    for r in step.decodes]
            rows += [(r, list(self.blocks.tables[r.request_id]), start, n)
                     for r, start, n in step.chunks]
            if not rows and not step.swap_out:
                return False
            for r, start, _ in step.chunks:
                if start == 0:
                    r.status = Status.PREFILLING
                    r.add_event("context_begin")
            pages_in = self._claim_swaps(step)
        self._move_swapped_pages(step, pages_in)
        if not rows:
            return True
        out = self.runner.chunked(rows)
        with self.lock:
            emit_reqs, emit_rows = list(step.decodes), list(range(len(step.decodes)))
            for j, (r, start, n) in enumerate(step.chunks):
                if r.finished:
                    continue
                if self.chunked.chunk_done(r, n):
                    r.add_event("context_end")
                    r.add_event("decoding_begin")
                    r.status = Status.DECODING
                    emit_reqs.append(r)
                    emit_rows.append(len(step.decodes) + j)
            finished = self._emit_tokens(emit_reqs, out, emit_rows)
            self._finish_decoded(self.scheduler, finished)
        return True
