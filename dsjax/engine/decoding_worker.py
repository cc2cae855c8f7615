"""The decoding loop that the decode, colocated and chunked roles share: continuous batching,
swap to host, and async scheduling (step N+1 dispatched before step N's samples are read)."""
from __future__ import annotations

import dataclasses
import logging
import time

import jax

from dsjax.engine.persistent_batch import PersistentBatch
from dsjax.engine.request import Request, Status
from dsjax.engine.scheduler import DecodeScheduler
from dsjax.engine.worker import InstanceWorker
from dsjax.executor.batch import DecodeRow

log = logging.getLogger("dsjax")


@dataclasses.dataclass
class InFlight:
    """A dispatched decode step whose samples the host has not read yet."""
    requests: list
    step: object          # the runner's PendingStep
    started: float


class DecodingWorker(InstanceWorker):
    """Continuous batching with swap to host: shared by decode, colocated and chunked.

    With async scheduling, step N+1 is dispatched before step N's samples are read: its rows
    take step N's tokens on the device, so the host's bookkeeping of step N (tokens, stop
    conditions, the report) overlaps step N+1's computation. A request that stops on step N's
    token (eos, a stop id) has run one step for nothing; one that reaches max_tokens does not."""

    def __init__(self, *args, async_scheduling: bool = False, **kw):
        super().__init__(*args, **kw)
        self.swapped_pages: dict[str, list] = {}   # host copies of swapped-out pages
        self.scheduler: DecodeScheduler
        self.async_scheduling = async_scheduling
        self._inflight: InFlight | None = None
        self.persistent = PersistentBatch(self.runner.decode_table_width)
        self._evictions_seen = 0

    def _forget(self, req: Request) -> None:
        self.scheduler.remove(req)
        self.swapped_pages.pop(req.request_id, None)

    def _apply_swaps(self, step) -> None:
        """Victims' pages to host (one sync for all), returning requests' pages back."""
        for r, why in step.dropped:
            self._fail(r.request_id, MemoryError(why))
        if step.swap_out:
            self.num_preemptions += len(step.swap_out)
            gathered = [self.runner.gather_pages(step.swap_out_blocks[r.request_id])
                        for r in step.swap_out]
            for r, pages in zip(step.swap_out, jax.device_get(gathered)):
                r.status = Status.SWAPPED
                # (gathers are padded to a power of two: up to twice the request's pages)
                self.swapped_pages[r.request_id] = self.runner.swap_copies(
                    pages, len(step.swap_out_blocks[r.request_id]))
        if step.copies:   # copy on write: sequences about to write into a shared block
            sources, targets = zip(*step.copies)
            self.runner.insert_pages(list(targets), self.runner.gather_pages(list(sources)))
        for r in step.swap_in:
            r.status = Status.DECODING
            self.runner.insert_pages(step.swap_in_blocks[r.request_id],
                                     self.swapped_pages.pop(r.request_id))

    def _start_sequences(self, req: Request, sequences: list[Request]) -> None:
        """A prompt's KV is in this instance's blocks (held under req's id): its running
        sequences join the decode queue, sharing those blocks when there are several."""
        if sequences != [req]:
            self.blocks.fork(req.request_id, [s.request_id for s in sequences])
            self.requests.pop(req.request_id, None)
        for s in sequences:
            s.status = Status.DECODING
            self.requests[s.request_id] = s
            self.scheduler.add_waiting(s)

    def _decode_row(self, req: Request, prev_row: int = -1, busy=()) -> DecodeRow:
        """The request's next decode row; prev_row >= 0: its input token is the one the
        in-flight step samples in that row (the host does not have it yet)."""
        return DecodeRow(req.last_token_id if prev_row < 0 else -1, req.num_tokens - 1,
                         tuple(self.blocks.tables[req.request_id]),
                         self._sampling_row(req, busy), prev_row)

    def _busy(self, batch: list[Request]) -> set[str]:
        """Sequences whose sampling slots must stay: this step's and the one on the device."""
        busy = {r.request_id for r in batch}
        if self._inflight is not None:
            busy.update(r.request_id for r in self._inflight.requests)
        return busy

    def _decode_step(self) -> bool:
        """One continuous-batching step of self.scheduler; False if there was nothing to do."""
        start = time.perf_counter()
        step = self.scheduler.schedule()
        self._in_step = step.batch + step.swap_out
        if not step.batch and not step.swap_out and not step.dropped:
            if self._inflight is None:
                return False
            self._read_inflight()   # only last tokens are in flight: read them
            return True
        self._apply_swaps(step)
        if not step.batch:
            return True
        for r in step.batch:
            if not r.decoding_started:
                r.decoding_started = True
                self._event(r, "decoding_begin", start)
        if not self.async_scheduling or not self._dispatch(step, start):
            self._read_inflight()
            for r in self._decode_all_synchronously(step):
                self._release(r, finished=True)
            self._hold_report = True
            self._log_step(len(step.batch), start)
        return True

    def _new_rows(self, batch: list[Request], previous: InFlight | None = None):
        """build_rows for the persistent batch: rows of requests new to it (prev_row: where
        the in-flight step samples a row's input token, if it does)."""
        def build(requests: list[Request]) -> list[DecodeRow]:
            busy = self._busy(batch)
            row_of = {id(r): i for i, r in enumerate(previous.requests)} if previous else {}
            return [self._decode_row(r, row_of.get(id(r), -1), busy) for r in requests]
        return build

    def _carried_slots_valid(self) -> None:
        """A sampling slot taken outside a decode step (by a colocated prefill's sequences)
        may be a carried row's: then every row is built again, looking its slot up."""
        if self.slots.evictions != self._evictions_seen:
            self._evictions_seen = self.slots.evictions
            self.persistent.reset()

    def _decode_all_synchronously(self, step) -> list[Request]:
        """A synchronous step of the whole batch from the persistent batch's columns, its
        tokens recorded; returns the requests that finished. If it fails with the runner
        intact, the step runs again row by row (_run_rows), where a request that breaks it
        fails alone."""
        self._carried_slots_valid()
        try:
            columns = self.persistent.next_step(step.batch, self._new_rows(step.batch),
                                                self.blocks.tables, step.rewritten, False)
            out = self._decode_synchronously(columns)
        except Exception as e:  # noqa: BLE001
            self.persistent.reset()
            self._check_state(e)
        else:
            return self._record_step(step.batch, out)
        busy = self._busy(step.batch)
        results = self._run_rows(self._decode_synchronously, step.batch,
                                 lambda r: self._decode_row(r, busy=busy))
        return self._emit_all(zip(step.batch, [rs and rs[0] for rs in results]))

    def _decode_synchronously(self, rows):
        """A decode step, waited for. The previous step's report goes out once this one is
        on the device: the router delivers those tokens while the device computes."""
        pending = self.runner.dispatch_decode(rows)
        self._flush()
        return self.runner.collect(pending)

    def _dispatch(self, step, start: float) -> bool:
        """Start the step without waiting, then read the one before it. False (nothing
        started) when the dispatch itself fails: the caller runs the step synchronously, where
        a request that breaks it fails alone."""
        previous, batch = self._inflight, step.batch
        self._carried_slots_valid()
        if previous is not None and previous.requests is not self.persistent.requests:
            self.persistent.reset()   # rows that ran the in-flight step are found by _new_rows
        try:
            columns = self.persistent.next_step(batch, self._new_rows(batch, previous),
                                                self.blocks.tables, step.rewritten,
                                                previous is not None)
            pending = self.runner.dispatch_decode(columns, previous.step if previous else None)
        except Exception as e:  # noqa: BLE001
            self.persistent.reset()
            self._check_state(e)
            return False
        for r in batch:
            r.pending += 1
        self._inflight = InFlight(batch, pending, start)
        if previous is not None:
            self._read(previous)
        return True

    def _read_inflight(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._read(inflight)

    def _read(self, inflight: InFlight) -> None:
        """Read a dispatched step's samples and record them; requests dropped meanwhile are
        skipped (their pages were freed; later work on the device comes after this step)."""
        for r in inflight.requests:
            r.pending -= 1
        try:
            out = self.runner.collect(inflight.step)
        except Exception as e:  # noqa: BLE001 - the step failed on the device
            self._check_state(e)
            for r in inflight.requests:
                self._fail(r.request_id, e)
            return
        owned = self.requests
        live = [r if owned.get(r.request_id) is r else None for r in inflight.requests]
        for r in self._record_step(live, out):
            self._release(r, finished=True)
        self._log_step(len(inflight.requests), inflight.started)

    def _record_step(self, requests: list, out) -> list[Request]:
        """Record a decode step's samples (a StepOutput, one row per request; None: a request
        dropped meanwhile); returns the requests that finished."""
        return self._record(requests, out.tokens.tolist(), out.logprob.tolist(), out.top_ids,
                            out.top_logprobs)

    def _log_step(self, batch_size: int, start: float) -> None:
        if self.step_log is not None:
            now = time.perf_counter()
            self.step_log.append((batch_size, now - start, self.runner.last_wait_s, now))

    def has_work(self) -> bool:
        return len(self.scheduler) > 0 or self._inflight is not None

    def counts(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "swapped": len(s.swapped)}
