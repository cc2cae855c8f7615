"""Scheduling policy, pure Python: which requests run in the next step. No JAX inside.

The schedulers only decide and keep block tables (through BlockManager); instances carry out the
device work (prefill, decode, swaps, migration) the decisions call for.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from dsjax.engine.block_manager import BlockManager


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_tokens_per_batch: int


def cached_prefix(blocks: BlockManager, request) -> list[int]:
    """The cached blocks a prompt may start from: its full blocks' longest cached prefix,
    leaving at least its last token to compute (its logits pick the first output token)."""
    if not (blocks.caching and request.caches_prefix):
        return []
    return blocks.cached_prefix(request.prompt_token_ids, request.cache_salt,
                                limit=request.prompt_len - 1)


def claim_cached(blocks: BlockManager, request, hits: list[int], num_tokens: int) -> None:
    """Allocate the request's table from its cache hits, count the query, and start its
    computation after them."""
    blocks.allocate(request.request_id, num_tokens, cached=hits)
    request.num_computed = request.num_cached_tokens = len(hits) * blocks.block_size
    blocks.count_query(request.prompt_len, request.num_computed)


class PrefillScheduler:
    """FCFS prompt batching. A batch grows while it has <= max_batch_size prompts, <=
    max_tokens_per_batch prompt tokens to compute (a cached prefix is not computed), and its
    blocks fit beside the blocks already held (which include prefilled requests not yet pulled
    by a decode instance: that is the back-pressure)."""

    def __init__(self, limits: BatchLimits, blocks: BlockManager):
        self.limits = limits
        self.blocks = blocks
        self.waiting: deque = deque()

    def add(self, request) -> None:
        self.waiting.append(request)

    def remove(self, request) -> bool:
        try:
            self.waiting.remove(request)
            return True
        except ValueError:
            return False

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.prompt_len for r in self.waiting)

    def schedule(self, max_batch_size: int | None = None) -> list:
        """Pop the next batch and allocate its blocks; [] if the head of the queue cannot start."""
        limit = self.limits.max_batch_size if max_batch_size is None else max_batch_size
        batch, tokens = [], 0
        while self.waiting and len(batch) < limit:
            req = self.waiting[0]
            hits = cached_prefix(self.blocks, req)
            fresh = req.prompt_len - len(hits) * self.blocks.block_size
            if tokens + fresh > self.limits.max_tokens_per_batch and batch:
                break
            if not self.blocks.can_allocate(self.blocks.cost(hits, req.prompt_len)):
                break
            self.waiting.popleft()
            claim_cached(self.blocks, req, hits, req.prompt_len)
            batch.append(req)
            tokens += fresh
        return batch


@dataclasses.dataclass
class DecodeStep:
    batch: list            # requests that produce one token this step, in batch order
    swap_in: list          # swapped requests brought back before this step
    swap_out: list         # requests moved to host to make room
    swap_out_blocks: dict = dataclasses.field(default_factory=dict)  # id -> device blocks left
    swap_in_blocks: dict = dataclasses.field(default_factory=dict)   # id -> device blocks filled
    dropped: list = dataclasses.field(default_factory=list)  # (request, why): no room anywhere
    copies: list = dataclasses.field(default_factory=list)   # (src, dst) pages to copy first
    # Indices into `batch` of requests whose block table changed for this step (a new page, a
    # copy on write): a persistent batch copies only those tables again.
    rewritten: list = dataclasses.field(default_factory=list)


class DecodeScheduler:
    """FCFS continuous batching. Each step every running request needs a slot for its newest
    token; when blocks run out the newest request is swapped to host, and swapped requests come
    back (oldest first) before any waiting request is admitted. Nothing is dropped."""

    def __init__(self, limits: BatchLimits, blocks: BlockManager, waiting_share: float = 0.05):
        self.limits = limits
        self.blocks = blocks
        # Pull only while the prompts waiting here hold under this share of the KV blocks:
        # the queue then lives in prefill memory, as in DistServe (EngineConfig's setting).
        self.waiting_share = waiting_share
        self.waiting: deque = deque()   # KV resident here, not yet in the running batch
        self.running: list = []
        self.swapped: deque = deque()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def can_pull(self, num_tokens: int, in_flight_blocks: int = 0, hits=()) -> bool:
        """Whether to accept (and allocate for) one more migrating request of num_tokens cached
        tokens, with `in_flight_blocks` already allocated for pulls not yet arrived (they count
        as waiting: each pull is judged with the ones before it); `hits`: the blocks of its
        prefix this instance's cache holds already."""
        if self.swapped:
            return False
        waiting_blocks = in_flight_blocks + sum(len(self.blocks.tables[r.request_id])
                                                for r in self.waiting)
        if waiting_blocks and waiting_blocks >= self.waiting_share * self.blocks.num_total:
            return False
        # Keep one block per running request free so the running batch can still grow.
        reserve = len(self.running)
        return self.blocks.can_allocate(self.blocks.cost(hits, num_tokens) + reserve)

    def swap_in_blocked(self) -> bool:
        """Nothing runs or waits, and the oldest swapped request cannot come back: only pages
        held outside this scheduler (partly computed prompts, in chunked mode) can free room."""
        if not self.swapped or self.running or self.waiting:
            return False
        return self.blocks.blocks_needed(self.swapped[0].num_tokens) > self.blocks.device.num_free

    def add_waiting(self, request) -> None:
        """A request whose KV is already in this instance's blocks (after migration or prefill)."""
        self.waiting.append(request)

    def remove(self, request) -> bool:
        for queue in (self.waiting, self.running, self.swapped):
            if request in queue:
                queue.remove(request)
                return True
        return False

    def schedule(self) -> DecodeStep:
        swap_in, swap_out, swap_out_blocks, swap_in_blocks, dropped = [], [], {}, {}, []
        # Swapped requests return first, oldest first, only when they and every running
        # request can grow this step (else the newcomer would be the next victim at once).
        growth = sum(self.blocks.extra_blocks_for(r.request_id, r.num_tokens)
                     for r in self.running) if self.swapped else 0
        while self.swapped and len(self.running) < self.limits.max_batch_size:
            req = self.swapped[0]
            need = self.blocks.blocks_needed(req.num_tokens)
            if need + growth > self.blocks.device.num_free:
                break
            growth += need - len(self.blocks.host_tables[req.request_id])
            self.swapped.popleft()
            _, swap_in_blocks[req.request_id] = self.blocks.swap_in(req.request_id)
            self.running.append(req)
            swap_in.append(req)
        # New requests wait while swapped ones cannot return, unless nothing runs: then the
        # waiting requests (whose pages are already here) run, finish and make the room.
        if self.waiting and (not self.swapped or not self.running):
            tokens = sum(r.num_tokens for r in self.running)
            while self.waiting and len(self.running) < self.limits.max_batch_size:
                req = self.waiting[0]
                if tokens + req.num_tokens > self.limits.max_tokens_per_batch and self.running:
                    break
                self.waiting.popleft()
                self.running.append(req)
                tokens += req.num_tokens
        # Every running request needs room for the KV of its newest token (position num_tokens-1),
        # in a block of its own (sequences forked from one prompt share blocks until they write).
        # A request whose last token is still being computed sits this step out.
        i, copies, batch, rewritten = 0, [], [], []
        while i < len(self.running):
            req = self.running[i]
            if not req.can_step:
                i += 1
                continue
            ok, copy, changed = self.blocks.prepare_write(req.request_id, req.num_tokens)
            if ok:
                if copy is not None:
                    copies.append(copy)
                if changed:
                    rewritten.append(len(batch))
                batch.append(req)
                i += 1
                continue
            victim = self.running.pop()   # never one already in the batch (those come before i)
            if not self.blocks.can_swap_out(victim.request_id):
                # Neither device nor host memory can hold it: this request fails, alone.
                self.blocks.free(victim.request_id)
                dropped.append((victim, "KV blocks exhausted and the host swap space is full: "
                                        "raise --swap-space or lower the batch limits"))
                continue
            swap_out_blocks[victim.request_id], _ = self.blocks.swap_out(victim.request_id)
            self.swapped.appendleft(victim)  # victims leave newest-first, so the deque stays oldest-first
            swap_out.append(victim)
        if copies:   # a copy whose destination a later swap-out in this loop freed is moot
            live = {b for r in self.running for b in self.blocks.tables[r.request_id]}
            copies = [c for c in copies if c[1] in live]
        return DecodeStep(batch=batch, swap_in=swap_in, swap_out=swap_out,
                          swap_out_blocks=swap_out_blocks, swap_in_blocks=swap_in_blocks,
                          dropped=dropped, copies=copies, rewritten=rewritten)

    def finish(self, request) -> None:
        """Drop a finished request from the running batch and free its blocks."""
        self.remove(request)
        self.blocks.free(request.request_id)


@dataclasses.dataclass
class ChunkedStep:
    """A Sarathi step: the decode scheduler's step (its batch runs one token each), then
    prompt chunks."""
    decode: DecodeStep
    chunks: list           # (request, start, length): prompt tokens start:start+length this step


class ChunkedScheduler:
    """A per-step token budget filled with every running decode first, then prefill chunks of
    waiting prompts in FCFS order (Sarathi-Serve / vLLM v1)."""

    def __init__(self, limits: BatchLimits, blocks: BlockManager, waiting_share: float = 0.05):
        self.limits = limits
        self.blocks = blocks
        self.decode = DecodeScheduler(limits, blocks, waiting_share)
        self.prefilling: deque = deque()  # prompts not fully computed, FCFS

    def add(self, request) -> None:
        self.prefilling.append(request)

    def remove(self, request) -> bool:
        if request in self.prefilling:
            self.prefilling.remove(request)
            return True
        return self.decode.remove(request)

    def __len__(self) -> int:
        return len(self.prefilling) + len(self.decode)

    def schedule(self) -> ChunkedStep:
        if self.decode.swap_in_blocked():
            # Nothing can run and the swapped requests cannot come back: the pages held by
            # partly computed prompts are the only ones left. Give them up (those prompts
            # restart) before the decode scheduler decides, so its one decision stands.
            for req in self.prefilling:
                if req.request_id in self.blocks.tables:
                    self.blocks.free(req.request_id)
                    req.num_computed = 0
        step = self.decode.schedule()
        budget = self.limits.max_tokens_per_batch - len(step.batch)
        rows = len(step.batch)
        chunks = []
        for req in self.prefilling:
            if budget <= 0 or rows >= self.limits.max_batch_size or self.decode.swapped:
                break
            new = req.request_id not in self.blocks.tables
            hits = cached_prefix(self.blocks, req) if new else []
            start = len(hits) * self.blocks.block_size if new else req.num_computed
            length = min(req.prompt_len - start, budget)
            # The chunk that ends a prompt samples each of its sequences (n, best_of): they
            # count against the batch limit, which bounds every step's shapes.
            samples = req.num_samples if start + length == req.prompt_len else 1
            if rows and rows + samples > self.limits.max_batch_size:
                break
            if new:
                if not self.blocks.can_allocate(self.blocks.cost(hits, start + length)):
                    break
                claim_cached(self.blocks, req, hits, start + length)
            elif not self.blocks.grow(req.request_id, start + length):
                break
            chunks.append((req, start, length))
            budget -= length
            rows += samples
        return ChunkedStep(decode=step, chunks=chunks)

    def chunk_done(self, request, length: int) -> bool:
        """Record a computed chunk; True when the prompt is complete (it then decodes)."""
        request.num_computed += length
        if request.num_computed < request.prompt_len:
            return False
        self.prefilling.remove(request)
        self.decode.running.append(request)
        return True

    def finish(self, request) -> None:
        self.remove(request)
        self.blocks.free(request.request_id)
