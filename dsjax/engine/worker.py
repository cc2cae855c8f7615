"""Instance workers: each owns one instance's requests, scheduler, block tables and runner.

A worker runs one loop, in a thread of the engine's process or in a process of its own (see
dsjax.engine.instance_hosts), and talks to the engine only by messages (dsjax.engine.messages):

    loop:  apply the messages that arrived (adds, aborts, offers, KV exports/imports)
           run one step (schedule, build plain rows, runner, emit tokens)
           send one Report (tokens, lifetime events, offers, failures, fresh stats)

Nothing else reads or writes its requests, so there are no locks. Aborts and stop strings
arrive as messages and are applied between steps.

Faults stay contained. Host-side work on one request (building its row, recording its token)
fails that request alone. A step that raises while the runner's state is intact is retried one
request at a time, so only the request that breaks it fails. A step that leaves the page pools
lost (a device or runtime fault) stops the instance: its requests fail with that error and the
engine serves on with the instances that remain.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import time
from collections import deque
from typing import Callable

import jax

from dsjax.engine.block_manager import BlockManager
from dsjax.engine.messages import (AbortRequest, AddRequest, ExportKV, InstanceFailed, KVReady,
                                   KVRefused, LifetimeEvent, MigrationOffer, OfferMigration,
                                   PeerMessage, Report, RequestFailed, Shutdown, TokenUpdate)
from dsjax.engine.request import Request, Status
from dsjax.engine.sampling_slots import SlotAssignments
from dsjax.engine.scheduler import BatchLimits, ChunkedScheduler, DecodeScheduler, PrefillScheduler
from dsjax.executor.batch import ChunkRow, DecodeRow, PrefillRow
from dsjax.executor.kv_migration import KVPullFailed, arrays_of, await_arrival, land_shards
from dsjax.executor.runner import StepOutput
from dsjax.executor.sampling import needs_slot

log = logging.getLogger("dsjax")

IDLE_WAIT_S = 1.0   # how long an idle worker blocks on its inbox before looking again
PULL_WAITERS = 8    # threads per decode instance waiting for arriving KV


class InstanceFault(RuntimeError):
    """The instance's device state is gone: it cannot serve any request any more."""


class KVLost(RuntimeError):
    """A request's KV could not be had from its source (timed out, or the source failed)."""


@dataclasses.dataclass(frozen=True)
class ImportArrived:
    """From a pull's waiter thread to its worker's loop: every array arrived (error None),
    or not (why)."""
    request_id: str
    error: str | None


class InstanceWorker:
    """The loop, message handling, token emission, failure containment and stats."""

    role = ""

    def __init__(self, name: str, runner, blocks: BlockManager, eos_token_id,
                 kv_link, send: Callable[[object], None], tokenizer=None):
        self.name = name
        self.tokenizer = tokenizer   # for stop strings
        self.runner = runner
        self.blocks = blocks
        self.eos_token_id = eos_token_id
        self.kv = kv_link
        self._send = send
        self.requests: dict[str, Request] = {}
        self.slots = SlotAssignments(runner.max_sampled_rows)
        self.steps = 0
        self.loop_iterations = 0
        self.busy_s = 0.0
        self.tokens_out = 0
        self.num_preemptions = 0
        # Benchmarks set a list here to get (batch size, step seconds, device-wait seconds,
        # time read) per decode step.
        self.step_log: list | None = None
        self._reset_report()
        self._last_stats: dict | None = None

    # ---- the loop -----------------------------------------------------------------------------

    def run(self, inbox) -> None:
        """Serve until a Shutdown message; an instance fault ends the loop after reporting."""
        self._inbox = inbox
        try:
            idle = False
            while True:
                # A step that could do nothing (blocks held, pulls outstanding) waits for a
                # message (a pull, a free, an abort) instead of spinning on the same state.
                for msg in self._drain(inbox, block=idle or not self.has_work()):
                    if isinstance(msg, Shutdown):
                        return
                    self._apply(msg)
                self.loop_iterations += 1
                idle = not self._step_contained()
                self._flush()
        except InstanceFault as fault:
            self._fail_everything(fault)
        finally:
            self.close()
            self.kv.close()

    def _drain(self, inbox, block: bool) -> list:
        msgs = []
        try:
            msgs.append(inbox.get(timeout=IDLE_WAIT_S) if block else inbox.get_nowait())
            while True:
                msgs.append(inbox.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def _apply(self, msg) -> None:
        handler = {AddRequest: lambda m: self._admit(Request(m.spec, self.eos_token_id,
                                                             index=None)),
                   AbortRequest: lambda m: self._drop(m.request_id, m.index),
                   OfferMigration: lambda m: self._offered(m.offer),
                   ExportKV: lambda m: self._export(m.request_id, m.dest, m.skip_blocks),
                   KVReady: lambda m: self._import(m.request_id, m.payload),
                   ImportArrived: lambda m: self._arrived(m.request_id, m.error),
                   KVRefused: lambda m: self._drop(m.request_id)}.get(type(msg))
        if handler is None:
            log.error("%s: unexpected message %r", self.name, msg)
            return
        rid = getattr(msg, "request_id", None) or getattr(getattr(msg, "spec", None),
                                                          "request_id", None)
        try:
            handler(msg)
        except InstanceFault:
            raise
        except Exception as e:  # noqa: BLE001 - this message's request fails, the rest go on
            self._check_state(e)
            if rid is not None:
                self._fail(rid, e)
            else:
                log.exception("%s: handling %s failed", self.name, type(msg).__name__)

    def close(self) -> None:
        """Release what the loop started (subclasses: their helper threads)."""

    def _step_contained(self) -> bool:
        """One step; whether it did anything."""
        start = time.perf_counter()
        self._in_step: list[Request] = []
        try:
            did_work = self.step()
        except InstanceFault:
            raise
        except Exception as e:  # noqa: BLE001 - a scheduling bug: fail this step's requests
            self._check_state(e)
            if not self._in_step:
                # No request owns it: retrying would fail the same way forever. The instance
                # stops, visibly, and the engine serves on with the others.
                raise InstanceFault(f"{self.name}: a step failed outside any request: "
                                    f"{type(e).__name__}: {e}") from e
            log.exception("%s: step failed; failing its %d requests", self.name,
                          len(self._in_step))
            for r in self._in_step:
                self._fail(r.request_id, e)
            return True
        if did_work:
            self.steps += 1
            self.busy_s += time.perf_counter() - start
        return bool(did_work)

    def _check_state(self, error: BaseException) -> None:
        if not self.runner.healthy():
            raise InstanceFault(f"{self.name} lost its device state: "
                                f"{type(error).__name__}: {error}") from error

    def _sampling_row(self, req: Request, busy=()):
        """The sequence's sampling row; one that needs the sampler's slot table gets its row,
        filled from its tokens when it has none. `busy`: sequence ids whose rows must stay."""
        if not needs_slot(req.params):
            return req.sampling_row()
        slot = self.slots.lookup(req.request_id)
        if slot is None:
            slot = self.slots.assign(req.request_id, busy)
            self.runner.fill_sampling_slot(slot, req.params, *req.penalty_history())
        return req.sampling_row(slot)

    # ---- subclasses ---------------------------------------------------------------------------

    def has_work(self) -> bool:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    def _admit(self, req: Request) -> None:
        raise ValueError(f"{self.name} ({self.role}) takes no new requests")

    def _offered(self, offer: MigrationOffer) -> None:
        raise ValueError(f"{self.name} ({self.role}) takes no migrations")

    def _export(self, request_id: str, dest: str, skip_blocks: int = 0) -> None:
        raise ValueError(f"{self.name} ({self.role}) exports no KV")

    def _import(self, request_id: str, payload) -> None:
        raise ValueError(f"{self.name} ({self.role}) imports no KV")

    def _forget(self, req: Request) -> None:
        """Remove a request from this worker's queues (its blocks are freed by the caller)."""
        raise NotImplementedError

    def counts(self) -> dict:
        raise NotImplementedError

    # ---- running rows -------------------------------------------------------------------------

    def _run_rows(self, fn, requests: list[Request], build_row) -> list:
        """Build each request's row, run them in one step, and return per request the list of
        its sampled rows' results (token, logprob, top_ids, top_logprobs, prompt scores), or
        None where that request failed (it has been failed and freed). If the whole step
        raises with the runner intact, each request is retried alone, so only the one that
        breaks the step fails."""
        rows, live = [], []
        for r in requests:
            try:
                rows.append(build_row(r))
                live.append(r)
            except Exception as e:  # noqa: BLE001 - this request's row is malformed
                self._fail(r.request_id, e)
        results = {}
        if rows:
            try:
                results = dict(zip([r.request_id for r in live], _per_row(rows, fn(rows))))
            except Exception as e:  # noqa: BLE001
                self._check_state(e)
                if len(rows) == 1:
                    self._fail(live[0].request_id, e)
                else:
                    log.warning("%s: a step of %d requests failed (%s: %s); retrying each alone",
                                self.name, len(rows), type(e).__name__, e)
                    for r, row in zip(live, rows):
                        try:
                            results[r.request_id] = _per_row([row], fn([row]))[0]
                        except Exception as solo:  # noqa: BLE001
                            self._check_state(solo)
                            self._fail(r.request_id, solo)
        return [results.get(r.request_id) for r in requests]

    def _emit(self, req: Request, result, now: float) -> str | None:
        """Record a sampled token; returns the finish reason when it ends the sequence."""
        token, logprob, top_ids, top_logprobs, _ = result
        req.output_token_ids.append(token)
        logprobs = None
        n = req.params.logprobs
        if n is not None:
            logprobs = {}
            if n and top_ids is not None:
                logprobs = {int(t): float(lp) for t, lp in zip(top_ids[:n], top_logprobs[:n])}
            logprobs[token] = float(logprob)
        reason = req.stop_checker.check_token(token, req.num_generated)
        if reason is None and req.ends_on_stop_string(self.tokenizer):
            reason = "stop"
        self._tokens.append(TokenUpdate(req.spec.request_id, req.index or 0, token, logprob,
                                        logprobs, now, reason))
        self.tokens_out += 1
        return reason

    def _emit_all(self, pairs) -> list[Request]:
        """Emit (sequence, result) pairs (results of None were failed); returns those finished."""
        now = time.perf_counter()
        finished = []
        for req, result in pairs:
            if result is None:
                continue
            try:
                if self._emit(req, result, now) is not None:
                    finished.append(req)
            except Exception as e:  # noqa: BLE001 - recording this request's token failed
                self._fail(req.request_id, e)
        return finished

    def _prefill(self, batch: list[Request], hand_off) -> None:
        """Run a batch of whole prompts (blocks allocated), stream the first token of each of
        their sequences, free the requests that end there and hand_off(r, sequences) the
        others (the sequences still running)."""
        self._in_step = batch
        for r in batch:
            self._event(r, "context_begin")
        tables = {r.request_id: tuple(self.blocks.tables[r.request_id]) for r in batch}
        sequences = {r.request_id: r.sequences() for r in batch}
        busy = {s.request_id for seqs in sequences.values() for s in seqs}

        def row(r):
            return PrefillRow(r.prompt_token_ids, tables[r.request_id],
                              tuple(self._sampling_row(s, busy) for s in sequences[r.request_id]),
                              r.num_computed)
        # Prompts that start from cached blocks run as continuations of them (one program per
        # token bucket, like whole prompts).
        by_id = {}
        for fn, group in ((self.runner.prefill, [r for r in batch if not r.num_computed]),
                          (self.runner.prefill_cached, [r for r in batch if r.num_computed])):
            if group:
                by_id.update(zip(map(id, group), self._run_rows(fn, group, row)))
        results = [by_id[id(r)] for r in batch]
        now = time.perf_counter()
        for r, result in zip(batch, results):
            if result is None or r.request_id not in self.requests:
                continue
            self._event(r, "context_end", now)
            self.blocks.register(r.request_id, r.prompt_token_ids, r.cache_salt)
            self._cached_tokens.append((r.spec.request_id, r.num_cached_tokens))
            if r.params.prompt_logprobs is not None:
                self._prompt_logprobs.append((r.spec.request_id,
                                              prompt_logprob_entries(r, result[0][4])))
            seqs = sequences[r.request_id]
            ended = {id(s) for s in self._emit_all(zip(seqs, result))}
            running = [s for s in seqs if id(s) not in ended]
            for s in seqs:
                if id(s) in ended:
                    self.slots.release(s.request_id)
            if running and r.request_id in self.requests:
                hand_off(r, running)
            elif r.request_id in self.requests:
                self._release(r, finished=True)

    # ---- ending requests ----------------------------------------------------------------------

    def _release(self, req: Request, finished: bool = False) -> None:
        """Forget a request and free every block it holds here. A sequence that finished
        leaves its full blocks in the prefix cache (its prompt's were cached at prefill)."""
        self._forget(req)
        self.requests.pop(req.request_id, None)
        self.slots.release(req.request_id)
        if self.blocks.holds(req.request_id):
            tokens = req.kv_token_ids() if finished and req.index is not None else None
            self.blocks.free(req.request_id, tokens, req.cache_salt)

    def _drop(self, request_id: str, index: int | None = None) -> None:
        """The engine no longer wants this request here (abort, stop string, peer refusal):
        all its sequences, or only sequence `index`."""
        for req in [r for r in self.requests.values() if r.spec.request_id == request_id
                    and (index is None or r.index == index)]:
            self._release(req)

    def _fail(self, request_id: str, error: BaseException) -> None:
        """One request fails alone: free it (every sequence of it), tell the engine why.
        request_id is a sequence's id or the request's own."""
        log.warning("%s: request %s failed: %s: %s", self.name, request_id,
                    type(error).__name__, error)
        req = self.requests.get(request_id)
        group = req.spec.request_id if req is not None else request_id.split("#")[0]
        for r in [r for r in self.requests.values() if r.spec.request_id == group]:
            try:
                self._release(r)
            except Exception:  # noqa: BLE001 - its bookkeeping is what broke; drop the entry
                log.exception("%s: freeing %s failed", self.name, r.request_id)
                self.requests.pop(r.request_id, None)
        self._failed.append(RequestFailed(group, f"{type(error).__name__}: {error}",
                                          retryable=isinstance(error, KVLost)))

    def _fail_everything(self, fault: InstanceFault) -> None:
        """The instance stops: the engine learns it once (InstanceFailed) and decides for
        every request it held, as it does when a host dies without a word."""
        log.error("instance %s stopped: %s", self.name, fault)
        self.requests.clear()
        self._flush()
        self._send(InstanceFailed(self.name, str(fault)))

    # ---- reports ------------------------------------------------------------------------------

    def _event(self, req: Request, event_type: str, timestamp: float | None = None) -> None:
        self._events.append(LifetimeEvent(req.spec.request_id, event_type,
                                          time.perf_counter() if timestamp is None else timestamp))

    def _peer(self, dest: str, message) -> None:
        self._send(PeerMessage(dest, message))

    def _reset_report(self) -> None:
        self._tokens, self._events, self._failed = [], [], []
        self._prefilled, self._migrations, self._prompt_logprobs = [], [], []
        self._cached_tokens = []

    def stats(self) -> dict:
        host = self.blocks.host
        return {"instance": self.name, "role": self.role, **self.counts(),
                "blocks_used": self.blocks.num_used, "blocks_total": self.blocks.num_total,
                "blocks_cached": self.blocks.num_cached,
                "prefix_cache_queries": self.blocks.queries,
                "prefix_cache_hits": self.blocks.hits,
                "host_blocks_used": host.num_used if host else 0,
                "num_preemptions": self.num_preemptions, "steps": self.steps,
                "busy_s": self.busy_s, "tokens": self.tokens_out}

    def _flush(self) -> None:
        stats = self.stats()
        changed = {k: v for k, v in stats.items() if k != "busy_s"} != \
            {k: v for k, v in (self._last_stats or {}).items() if k != "busy_s"}
        if not (changed or self._tokens or self._events or self._failed or self._prefilled
                or self._migrations or self._prompt_logprobs or self._cached_tokens):
            return
        self._last_stats = stats
        self._send(Report(self.name, tuple(self._tokens), tuple(self._events),
                          tuple(self._prefilled), tuple(self._failed), tuple(self._migrations),
                          stats, tuple(self._prompt_logprobs), tuple(self._cached_tokens)))
        self._reset_report()


def _samples_of(out: StepOutput) -> list[tuple]:
    """A step's sampled rows: (token, logprob, top ids, top logprobs, prompt scores)."""
    top = out.top_ids is not None
    scores = out.prompt_scores or [None] * len(out.tokens)
    return [(int(out.tokens[i]), float(out.logprob[i]),
             out.top_ids[i] if top else None, out.top_logprobs[i] if top else None, scores[i])
            for i in range(len(out.tokens))]


def _per_row(rows, out: StepOutput) -> list[list]:
    """A step's sampled rows, grouped by the row (prompt or sequence) that asked for them."""
    flat = _samples_of(out)
    grouped, at = [], 0
    for row in rows:
        n = len(row.sampling) if isinstance(row.sampling, tuple) else 1
        grouped.append(flat[at:at + n])
        at += n
    return grouped


def prompt_logprob_entries(req: Request, scores) -> tuple[dict[int, float], ...]:
    """One {token: logprob} per prompt token after the first: the token's own and the top-N
    the request asked for (OpenAI's echo with logprobs)."""
    next_lp, top_ids, top_lps = scores
    n = req.params.prompt_logprobs
    entries = []
    for i, token in enumerate(req.prompt_token_ids[1:]):
        entry = {int(t): float(lp) for t, lp in zip(top_ids[i][:n], top_lps[i][:n])} if n else {}
        entry[int(token)] = float(next_lp[i])
        entries.append(entry)
    return tuple(entries)


class PrefillWorker(InstanceWorker):
    """Runs prompt batches; prefilled requests keep their blocks until a decode instance asks
    for their KV (ExportKV), which is the back-pressure on new prompts."""

    role = "prefill"

    def __init__(self, *args, limits: BatchLimits, **kw):
        super().__init__(*args, **kw)
        self.scheduler = PrefillScheduler(limits, self.blocks)
        self.held: dict[str, Request] = {}   # prefilled, waiting for a decode instance

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting)

    def counts(self) -> dict:
        return {"running": 0, "waiting": len(self.scheduler.waiting), "swapped": 0,
                "held": len(self.held), "waiting_tokens": self.scheduler.num_waiting_tokens,
                "token_budget": self.scheduler.limits.max_tokens_per_batch}

    def _admit(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def _forget(self, req: Request) -> None:
        self.scheduler.remove(req)
        self.held.pop(req.request_id, None)

    def step(self) -> bool:
        batch = self.scheduler.schedule()
        if batch:
            self._prefill(batch, self._hold)
        return bool(batch)

    def _hold(self, req: Request, sequences: list[Request]) -> None:
        for s in sequences:   # the decode instance fills its own slots from these tokens
            self.slots.release(s.request_id)
        req.status = Status.WAITING_MIGRATION
        self.held[req.request_id] = req
        self._prefilled.append(MigrationOffer(
            req.spec, tuple((s.index, tuple(s.output_token_ids)) for s in sequences), self.name))

    def _export(self, request_id: str, dest: str, skip_blocks: int = 0) -> None:
        req = self.held.get(request_id)
        if req is None:
            self._peer(dest, KVRefused(request_id, f"{request_id} is no longer held by "
                                                   f"{self.name}"))
            return
        # The puller's prefix cache holds the first skip_blocks: only the rest moves.
        table = self.blocks.tables[request_id][skip_blocks:]
        try:
            payload = self.kv.export(self.runner, table) if table else None
        except Exception as e:
            self._peer(dest, KVRefused(request_id, f"exporting its KV failed: {e}"))
            raise
        # The export copied the pages: they are free for new prompts at once.
        self._release(req)
        self._peer(dest, KVReady(request_id, payload))


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
                self.swapped_pages[r.request_id] = pages
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
        if not self.async_scheduling or not self._dispatch(step.batch, start):
            self._read_inflight()
            busy = self._busy(step.batch)
            results = self._run_rows(self.runner.decode, step.batch,
                                     lambda r: self._decode_row(r, busy=busy))
            for r in self._emit_all(zip(step.batch, [rs and rs[0] for rs in results])):
                self._release(r, finished=True)
            self._log_step(len(step.batch), start)
        return True

    def _dispatch(self, batch: list[Request], start: float) -> bool:
        """Start the step without waiting, then read the one before it. False (nothing
        started) when the dispatch itself fails: the caller runs the step synchronously, where
        a request that breaks it fails alone."""
        previous = self._inflight
        row_of = {id(r): i for i, r in enumerate(previous.requests)} if previous else {}
        try:
            busy = self._busy(batch)
            rows = [self._decode_row(r, row_of.get(id(r), -1), busy) for r in batch]
            pending = self.runner.dispatch_decode(rows, previous.step if previous else None)
        except Exception as e:  # noqa: BLE001
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
        live = [(r, sample) for r, sample in zip(inflight.requests, _samples_of(out))
                if self.requests.get(r.request_id) is r]
        for r in self._emit_all(live):
            self._release(r, finished=True)
        self._log_step(len(inflight.requests), inflight.started)

    def _log_step(self, batch_size: int, start: float) -> None:
        if self.step_log is not None:
            now = time.perf_counter()
            self.step_log.append((batch_size, now - start, self.runner.last_wait_s, now))

    def has_work(self) -> bool:
        return len(self.scheduler) > 0 or self._inflight is not None

    def counts(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "swapped": len(s.swapped)}


class DecodeWorker(DecodingWorker):
    """Pulls prefilled requests when it has room (FCFS, one at a time against the waiting
    share), then decodes them with continuous batching."""

    role = "decode"

    def __init__(self, *args, limits: BatchLimits, waiting_share: float,
                 pull_timeout_s: float = 30.0, **kw):
        super().__init__(*args, **kw)
        self.scheduler = DecodeScheduler(limits, self.blocks, waiting_share)
        self.offers: deque[MigrationOffer] = deque()
        # KV asked for, not arrived: request id -> (offer, when asked); pages held under its id
        # (offer, when asked, blocks its own prefix cache supplied)
        self.migrating: dict[str, tuple[MigrationOffer, float, int]] = {}
        self.arriving: dict[str, list] = {}   # shards of pulls on the way
        self.pull_timeout_s = pull_timeout_s
        self._deadlines: dict[str, float] = {}
        self._waiters = None   # threads that wait for arriving KV (started on first use)
        self.migrated = {"migrations": 0, "migration_bytes": 0, "migration_seconds": 0.0,
                         "migration_blocks_skipped": 0, "migration_bytes_saved": 0}

    def counts(self) -> dict:
        return {**super().counts(), "offered": len(self.offers), "migrating": len(self.migrating),
                **self.migrated}

    def _offered(self, offer: MigrationOffer) -> None:
        self.offers.append(offer)

    def _drop(self, request_id: str, index: int | None = None) -> None:
        if index is None:
            self.offers = deque(o for o in self.offers if o.spec.request_id != request_id)
            if self.migrating.pop(request_id, None) is not None:
                self.blocks.free(request_id)
        super()._drop(request_id, index)

    def _request_pulls(self) -> None:
        """Ask for the KV of offered requests while there is room, each judged with the pulls
        already in flight (so one round cannot take every waiting request at once)."""
        while self.offers:
            offer = self.offers[0]
            in_flight = sum(len(self.blocks.tables[rid]) for rid in self.migrating)
            # Full prompt blocks this instance's prefix cache holds need not move.
            hits = self.blocks.cached_prefix(offer.spec.prompt_token_ids, offer.spec.cache_salt)
            if not self.scheduler.can_pull(offer.num_cached_tokens, in_flight, hits):
                return
            self.offers.popleft()
            rid = offer.spec.request_id
            try:
                self._pull(offer, hits)
            except Exception as e:  # noqa: BLE001 - this pull's request fails, alone
                self._check_state(e)
                if self.blocks.holds(rid):
                    self.blocks.free(rid)
                self.migrating.pop(rid, None)
                self._fail(rid, e)   # the router frees what the prefill instance holds

    def _pull(self, offer: MigrationOffer, hits: list[int]) -> None:
        """Room for the offer's KV (its cached prefix held), and the ask for the rest."""
        rid = offer.spec.request_id
        self.blocks.allocate(rid, offer.num_cached_tokens, cached=hits)
        self.blocks.count_query(offer.num_cached_tokens, len(hits) * self.blocks.block_size)
        began = time.perf_counter()
        self.migrating[rid] = (offer, began, len(hits))
        self._events.append(LifetimeEvent(rid, "migration_begin", began))
        self._peer(offer.source, ExportKV(rid, self.name, len(hits)))

    def _import(self, request_id: str, payload) -> None:
        """The source's answer: start receiving the pages. A waiter thread reports when every
        array has arrived (ImportArrived), and only then are they written into this
        instance's pages: a slow or dead source never stalls a decode step."""
        if request_id not in self.migrating:   # dropped meanwhile: its pages here are free
            if payload is not None:
                self.kv.discard(payload)
            return
        if payload is None:   # this instance's prefix cache held every block
            self._land(request_id, [])
            return
        if self._waiters is None:
            self._waiters = concurrent.futures.ThreadPoolExecutor(
                max_workers=PULL_WAITERS, thread_name_prefix=f"{self.name}-pull")
        # The time-out does not rely on a waiter (connecting to a stalled source may block
        # one): the loop checks deadlines each iteration. Whichever comes first decides; the
        # other finds nothing left to do.
        self._deadlines[request_id] = time.monotonic() + self.pull_timeout_s
        self._waiters.submit(self._await_arrival, request_id, payload, self._inbox,
                             self.migrating[request_id][0].source)

    def _expire_pulls(self) -> None:
        now = time.monotonic()
        for request_id, deadline in list(self._deadlines.items()):
            if request_id not in self.migrating:
                del self._deadlines[request_id]
            elif now > deadline:
                source = self.migrating[request_id][0].source
                self._apply(ImportArrived(request_id, f"KV pull from {source} took over "
                                                      f"{self.pull_timeout_s:g} s"))

    def _await_arrival(self, request_id: str, payload, inbox, source: str) -> None:
        """Waiter thread: start the transfer, wait for the arrays, then tell the loop."""
        started = time.monotonic()
        try:
            shards = self.arriving[request_id] = self.kv.receive(self.runner, payload)
            left = self.pull_timeout_s - (time.monotonic() - started)
            await_arrival(arrays_of(shards), max(left, 0.0), source)
        except KVPullFailed as e:
            inbox.put(ImportArrived(request_id, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - the source is unreachable
            inbox.put(ImportArrived(request_id, f"KV pull from {source} failed: "
                                                f"{type(e).__name__}: {e}"))
            return
        inbox.put(ImportArrived(request_id, None))

    def _arrived(self, request_id: str, error: str | None) -> None:
        shards = self.arriving.pop(request_id, None)
        self._deadlines.pop(request_id, None)
        if request_id not in self.migrating:   # dropped while arriving: nothing to write
            return
        if error is not None:
            self.migrating.pop(request_id)
            self.blocks.free(request_id)
            raise KVLost(error)
        self._land(request_id, shards)

    def _land(self, request_id: str, shards) -> None:
        """Write the arrived pages and start decoding the request's sequences."""
        offer, began, skipped = self.migrating.pop(request_id)
        table = self.blocks.tables[request_id]
        try:
            nbytes = land_shards(self.runner, shards, table[skipped:]) if shards else 0
        except Exception:
            self.blocks.free(request_id)
            raise
        self.blocks.register(request_id, offer.spec.prompt_token_ids, offer.spec.cache_salt)
        self.migrated["migration_blocks_skipped"] += skipped
        self.migrated["migration_bytes_saved"] += skipped * self.runner.bytes_per_page
        now = time.perf_counter()
        self._events.append(LifetimeEvent(request_id, "migration_end", now))
        self._migrations.append((nbytes, now - began))
        self.migrated["migrations"] += 1
        self.migrated["migration_bytes"] += nbytes
        self.migrated["migration_seconds"] += now - began
        group = Request(offer.spec, self.eos_token_id, index=None)
        self._start_sequences(group, Request.from_offer(offer, self.eos_token_id))

    def step(self) -> bool:
        self._expire_pulls()
        self._request_pulls()
        return self._decode_step()

    def has_work(self) -> bool:
        return super().has_work() or bool(self.offers)

    def close(self) -> None:
        if self._waiters is not None:
            self._waiters.shutdown(wait=False, cancel_futures=True)


class ColocatedWorker(DecodingWorker):
    """vLLM-style baseline: one instance, continuous batching, a waiting prompt batch runs first."""

    role = "colocated"

    def __init__(self, *args, prefill_limits: BatchLimits, decode_limits: BatchLimits,
                 waiting_share: float, **kw):
        super().__init__(*args, **kw)
        self.prefill = PrefillScheduler(prefill_limits, self.blocks)
        self.scheduler = DecodeScheduler(decode_limits, self.blocks, waiting_share)

    def has_work(self) -> bool:
        return bool(self.prefill.waiting) or super().has_work()

    def counts(self) -> dict:
        c = super().counts()
        c["waiting"] += len(self.prefill.waiting)
        c["waiting_tokens"] = self.prefill.num_waiting_tokens
        c["token_budget"] = self.prefill.limits.max_tokens_per_batch
        return c

    def _admit(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.prefill.add(req)

    def _forget(self, req: Request) -> None:
        super()._forget(req)
        self.prefill.remove(req)

    def step(self) -> bool:
        room = self.scheduler.limits.max_batch_size - len(self.scheduler)
        batch = []
        # Prompts first (vLLM's policy), unless requests are swapped out; keep a block per
        # running request in reserve so admitting prompts does not force a swap at once.
        if not self.scheduler.swapped and room > 0 and \
                self.blocks.num_free > len(self.scheduler.running):
            batch = self.prefill.schedule(max_batch_size=min(
                room, self.prefill.limits.max_batch_size))
        if not batch:
            return self._decode_step()
        self._prefill(batch, self._start_sequences)
        return True


class ChunkedWorker(DecodingWorker):
    """Sarathi-style: each step decodes every running request and fills the rest of a token
    budget with prompt chunks."""

    role = "chunked"

    def __init__(self, *args, limits: BatchLimits, waiting_share: float, **kw):
        super().__init__(*args, **kw)
        self.chunked = ChunkedScheduler(limits, self.blocks, waiting_share)
        self.scheduler = self.chunked.decode

    def has_work(self) -> bool:
        return len(self.chunked) > 0

    def counts(self) -> dict:
        c = super().counts()
        c["waiting"] += len(self.chunked.prefilling)
        c["waiting_tokens"] = sum(r.prompt_len - r.num_computed for r in self.chunked.prefilling)
        return c

    def _admit(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.chunked.add(req)

    def _forget(self, req: Request) -> None:
        super()._forget(req)
        self.chunked.remove(req)

    def step(self) -> bool:
        start = time.perf_counter()
        plan = self.chunked.schedule()
        step = plan.decode
        self._in_step = step.batch + step.swap_out + [r for r, _, _ in plan.chunks]
        if not step.batch and not plan.chunks and not step.swap_out and not step.dropped:
            return False
        self._apply_swaps(step)
        for r, first, _ in plan.chunks:
            if first == 0:
                self._event(r, "context_begin", start)
        for r in step.batch:
            if not r.decoding_started:
                r.decoding_started = True
                self._event(r, "decoding_begin", start)
        items = [(r, (r.last_token_id,), r.num_tokens - 1) for r in step.batch]
        items += [(r, r.prompt_token_ids[first:first + n], first) for r, first, n in plan.chunks]
        if not items:
            return True
        reqs = [r for r, _, _ in items]
        # The chunk that completes a prompt samples each of its sequences' first token.
        sequences = {id(r): r.sequences() for r, first, n in plan.chunks
                     if first + n == r.prompt_len}
        rows = {}
        busy = {r.request_id for r in reqs} | {q.request_id for seqs in sequences.values()
                                               for q in seqs}
        decoding = {id(r) for r in step.batch}
        for r, ids, first in items:
            seqs = sequences.get(id(r))
            if seqs:
                sampling = tuple(self._sampling_row(q, busy) for q in seqs)
            elif id(r) in decoding:
                sampling = (self._sampling_row(r, busy),)
            else:   # a chunk that does not end its prompt: its sample is dropped
                sampling = (r.sampling_row(),)
            rows[id(r)] = ChunkRow(tuple(ids), first, tuple(self.blocks.tables[r.request_id]),
                                   sampling)
        results = self._run_rows(self.runner.chunked, reqs, lambda r: rows[id(r)])
        emit = [(r, rs and rs[0]) for r, rs in zip(step.batch, results[:len(step.batch)])]
        now = time.perf_counter()
        for (r, first, n), rs in zip(plan.chunks, results[len(step.batch):]):
            if rs is None or r.request_id not in self.requests or \
                    not self.chunked.chunk_done(r, n):
                continue
            self._event(r, "context_end", now)
            self.blocks.register(r.request_id, r.prompt_token_ids, r.cache_salt)
            self._cached_tokens.append((r.spec.request_id, r.num_cached_tokens))
            self._event(r, "decoding_begin", now)
            seqs = sequences[id(r)]
            if seqs == [r]:
                r.decoding_started = True
                r.status = Status.DECODING
                emit.append((r, rs[0]))
                continue
            self.scheduler.running.remove(r)   # the prompt becomes its sequences
            ended = {id(q) for q in self._emit_all(zip(seqs, rs))}
            running = [q for q in seqs if id(q) not in ended]
            for q in seqs:
                if id(q) in ended:
                    self.slots.release(q.request_id)
            for q in running:
                q.decoding_started = True
            if running:
                self._start_sequences(r, running)
            else:
                self._release(r, finished=True)
        for r in self._emit_all(emit):
            self._release(r, finished=True)
        return True
