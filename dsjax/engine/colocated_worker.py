"""The baselines' roles on the shared decoding loop: colocated (vLLM-style, a waiting prompt
batch runs first) and chunked (Sarathi-style, prompt chunks fill each step's token budget)."""
from __future__ import annotations

import time

from dsjax.engine.decoding_worker import DecodingWorker
from dsjax.engine.request import Request, Status
from dsjax.engine.scheduler import BatchLimits, ChunkedScheduler, DecodeScheduler, PrefillScheduler
from dsjax.executor.batch import ChunkRow


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
        # The decode step still on the device records its samples into its sequences'
        # sampling slots: read it first, so that this prefill may take any slot it needs (a
        # sequence whose slot it takes is refilled later from every one of its tokens).
        self._read_inflight()
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
