"""Instance workers: each owns one instance's requests, scheduler, block tables and runner.

This module holds what every role shares (the loop, messages, faults); the roles live beside
it: prefill_worker, decode_worker (on decoding_worker's continuous batching, as are the
baselines in colocated_worker).

A worker runs one loop, in a thread of the engine's process or in a process of its own (see
dsjax.engine.instance_hosts), and talks to the engine only by messages (dsjax.engine.messages):

    loop:  apply the messages that arrived (adds, aborts, offers, KV exports/imports)
           run one step (schedule, build plain rows, runner, emit tokens)
           send one Report (tokens, lifetime events, offers, failures, fresh stats)

Nothing else reads or writes its requests, so there are no locks. Aborts arrive as messages
and are applied between steps; stop strings are checked here, where tokens are produced.

Faults stay contained. Host-side work on one request (building its row, recording its token)
fails that request alone. A step that raises while the runner's state is intact is retried one
request at a time, so only the request that breaks it fails. A step that leaves the page pools
lost (a device or runtime fault) stops the instance: its requests fail with that error and the
engine serves on with the instances that remain.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import time
from typing import Callable

from dsjax.engine.block_manager import BlockManager
from dsjax.engine.messages import (AbortRequest, AddRequest, ExportKV, InstanceFailed, KVReady,
                                   KVRefused, LifetimeEvent, MigrationOffer, OfferMigration,
                                   PeerMessage, Report, RequestFailed, Shutdown, StepTokens)
from dsjax.engine.request import Request
from dsjax.engine.sampling_slots import SlotAssignments
from dsjax.executor.batch import PrefillRow, SamplingRow
from dsjax.executor.runner import StepOutput
log = logging.getLogger("dsjax")

IDLE_WAIT_S = 1.0   # how long an idle worker blocks on its inbox before looking again


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
    # The transfer alone: from the waiter starting to receive to the last array's arrival,
    # without the waits for either instance's step to end (what the simulator's link models).
    transfer_s: float = 0.0
    # The arrived pages laid out for the instance's stages (kv_migration.reshard_pages, on
    # the waiter thread); carried here, so a request dropped meanwhile holds nothing.
    pages: list | None = None
    # Why that layout failed: a fault of this instance, not of the pull, so the request
    # fails (not retried: it would fail the same way again).
    layout_error: Exception | None = None


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
        self._hold_report = False
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
                        if self._tokens:   # a held report's tokens (see below)
                            self._flush()
                        return
                    self._apply(msg)
                self.loop_iterations += 1
                idle = not self._step_contained()
                # A step may hold its report for the next step to send once that one is
                # dispatched (the router's work then overlaps the device's, not the next
                # step's host work); only while more work follows at once, for one step.
                if not (self._hold_report and self.has_work()):
                    self._flush()
                self._hold_report = False
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
                   ImportArrived: lambda m: self._arrived(m.request_id, m.error, m.transfer_s,
                                                          m.pages, m.layout_error),
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
        if not req.needs_slot:
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
                grouped = per_row(rows, fn(rows))
                if len(live) == len(requests):   # every row built: the results line up
                    return grouped
                results = dict(zip([r.request_id for r in live], grouped))
            except Exception as e:  # noqa: BLE001
                self._check_state(e)
                if len(rows) == 1:
                    self._fail(live[0].request_id, e)
                else:
                    log.warning("%s: a step of %d requests failed (%s: %s); retrying each alone",
                                self.name, len(rows), type(e).__name__, e)
                    for r, row in zip(live, rows):
                        try:
                            results[r.request_id] = per_row([row], fn([row]))[0]
                        except Exception as solo:  # noqa: BLE001
                            self._check_state(solo)
                            self._fail(r.request_id, solo)
        return [results.get(r.request_id) for r in requests]

    def _emit_all(self, pairs) -> list[Request]:
        """Record (sequence, result) pairs (results of None were failed); see _record."""
        pairs = [(r, s) for r, s in pairs if s is not None]
        if not pairs:
            return []
        requests, samples = zip(*pairs)
        tokens, logprobs, top_ids, top_logprobs, _ = zip(*samples)
        return self._record(requests, tokens, logprobs, top_ids, top_logprobs)

    def _record(self, requests, tokens, logprobs, top_ids=None, top_logprobs=None
                ) -> list[Request]:
        """Record a step's sampled tokens, given as columns (a row whose request is None is
        skipped: it was dropped meanwhile), as one StepTokens of the report; returns the
        sequences that finished. No object is made per token. A step whose rows are all live
        and plain (no logprobs, no stop strings: a large batch's usual case) goes to
        _record_plain; here, in a mixed step, a plain row costs an append and one stop check."""
        now = time.perf_counter()
        if None not in requests and all([r.plain for r in requests]):
            return self._record_plain(requests, tokens, logprobs, now)
        rids, indexes, kept, lps, tops, finish = [], [], [], [], [], {}
        finished, any_top = [], False
        for row, (req, token) in enumerate(zip(requests, tokens)):
            if req is None:
                continue
            try:
                req.output_token_ids.append(token)
                if req.plain:
                    top = None
                    reason = req.stop_checker.check_token(
                        token, req.prior + len(req.output_token_ids))
                else:
                    top, reason = self._check_rich(
                        req, token, logprobs[row], top_ids[row] if top_ids is not None else None,
                        top_logprobs[row] if top_logprobs is not None else None)
                    any_top = any_top or top is not None
            except Exception as e:  # noqa: BLE001 - recording this request's token failed
                self._fail(req.request_id, e)
                continue
            if reason is not None:
                finish[len(rids)] = reason
                finished.append(req)
            rids.append(req.spec.request_id)
            indexes.append(req.index or 0)
            kept.append(token)
            lps.append(logprobs[row])
            tops.append(top)
        self._report_tokens(StepTokens(tuple(rids), tuple(indexes), tuple(kept), tuple(lps),
                                       tuple(tops) if any_top else None, finish, now))
        return finished

    def _report_tokens(self, tokens: StepTokens) -> None:
        """Add a step's recorded rows (if any) to the report the next flush sends."""
        if tokens.request_ids:
            self._tokens.append(tokens)
            self.tokens_out += len(tokens.request_ids)

    def _record_plain(self, requests, tokens, logprobs, now: float) -> list[Request]:
        """_record of a step whose rows are all live and plain (a large batch's usual case):
        per row an append and a test against its stop ids and length, whole columns besides."""
        finish, finished, failed = {}, [], []
        for row, (req, token) in enumerate(zip(requests, tokens)):
            out = req.output_token_ids
            out.append(token)
            if token in req.stop_ids or len(out) >= req.length_at:
                try:
                    reason = req.stop_checker.check_token(token, req.prior + len(out))
                except Exception as e:  # noqa: BLE001 - this request's check failed
                    self._fail(req.request_id, e)
                    failed.append(row)
                    continue
                if reason is not None:   # (a stop id before min_tokens is not)
                    finish[row] = reason
                    finished.append(req)
        if failed:   # the report leaves out the failed rows
            rows = sorted(set(range(len(requests))) - set(failed))
            finish = {i: finish[row] for i, row in enumerate(rows) if row in finish}
            requests, tokens, logprobs = ([column[row] for row in rows]
                                          for column in (requests, tokens, logprobs))
        self._report_tokens(StepTokens(
            tuple([r.spec.request_id for r in requests]),
            tuple([r.index or 0 for r in requests]), tuple(tokens), tuple(logprobs), None,
            finish, now))
        return finished

    def _check_rich(self, req: Request, token: int, logprob: float, top_ids, top_logprobs
                    ) -> tuple[dict | None, str | None]:
        """A token of a sequence that asks for log-probabilities or stop strings: its
        {token: logprob} of the chosen and top-N tokens (None if not asked), and its finish
        reason."""
        top = None
        n = req.params.logprobs
        if n is not None:
            top = {}
            if n and top_ids is not None:
                top = {int(t): float(lp) for t, lp in zip(top_ids[:n], top_logprobs[:n])}
            top[token] = float(logprob)
        reason = req.stop_checker.check_token(token, req.num_generated)
        if reason is None and req.ends_on_stop_string(self.tokenizer):
            reason = "stop"
        return top, reason

    def _prefill(self, batch: list[Request], hand_off) -> None:
        """Run a batch of whole prompts (blocks allocated), stream the first token of each of
        their sequences, free the requests that end there and hand_off(r, sequences) the
        others (the sequences still running)."""
        self._in_step = batch
        if self._tokens:   # a decode step's held report must not wait behind this prefill
            self._flush()
        # One stamp for the step: requests that share it (and context_end) ran as one batch,
        # which is how dsjax.eval.engine_fit recovers prefill steps.
        began = time.perf_counter()
        for r in batch:
            self._event(r, "context_begin", began)
        tables = {r.request_id: tuple(self.blocks.tables[r.request_id]) for r in batch}
        sequences = {r.request_id: r.sequences() for r in batch}
        # Slots this prefill may not take: its own sequences'. (No decode step is on the device
        # here: a colocated instance reads its in-flight step before it prefills.)
        busy = {s.request_id for seqs in sequences.values() for s in seqs}

        def row(r):
            return PrefillRow(r.prompt_token_ids, tables[r.request_id],
                              tuple(self._sampling_row(s, busy) for s in sequences[r.request_id]),
                              r.num_computed)
        # Prompts that start from cached blocks run as continuations of them (one program per
        # token bucket, like whole prompts), in the same step where every prefill does.
        by_id = {}
        steps = ((self.runner.prefill, batch),) if self.runner.prefill_reads_pages else \
            ((self.runner.prefill, [r for r in batch if not r.num_computed]),
             (self.runner.prefill_cached, [r for r in batch if r.num_computed]))
        for fn, group in steps:
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


def samples_of(out: StepOutput) -> list[tuple]:
    """A step's sampled rows: (token, logprob, top ids, top logprobs, prompt scores)."""
    n = len(out.tokens)
    none = [None] * n
    return list(zip(out.tokens.tolist(), out.logprob.tolist(),
                    none if out.top_ids is None else list(out.top_ids),
                    none if out.top_logprobs is None else list(out.top_logprobs),
                    out.prompt_scores or none))


def per_row(rows, out: StepOutput) -> list[list]:
    """A step's sampled rows, grouped by the row (prompt or sequence) that asked for them."""
    flat = samples_of(out)
    if all(type(row.sampling) is SamplingRow for row in rows):   # decode: one per row
        return [[s] for s in flat]
    grouped, at = [], 0
    for row in rows:
        n = len(row.sampling) if not isinstance(row.sampling, SamplingRow) else 1
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
