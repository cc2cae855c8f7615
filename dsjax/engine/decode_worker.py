"""The decode role: asks prefill instances for their requests' KV when it has room, waits for
the pulls beside its loop (a slow or dead source never stalls a step), then decodes."""
from __future__ import annotations

import concurrent.futures
import time
from collections import deque

from dsjax.engine.decoding_worker import DecodingWorker
from dsjax.engine.messages import ExportKV, LifetimeEvent, MigrationOffer
from dsjax.engine.request import Request
from dsjax.engine.scheduler import BatchLimits, DecodeScheduler
from dsjax.engine.worker import ImportArrived, KVLost
from dsjax.executor.kv_migration import (KVPullFailed, arrays_of, await_arrival, land_shards,
                                         reshard_pages)

PULL_WAITERS = 8    # threads per decode instance waiting for arriving KV


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
        """Waiter thread: start the transfer, wait for the arrays, lay them out for this
        instance's stages (here, not on the step loop, which then only writes them), then
        tell the loop."""
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
        transfer_s = time.monotonic() - started
        try:
            pages = reshard_pages(shards, self.runner)
        except Exception as e:  # noqa: BLE001 - this instance's fault: the request fails alone
            inbox.put(ImportArrived(request_id, None, transfer_s, layout_error=e))
            return
        inbox.put(ImportArrived(request_id, None, transfer_s, pages))

    def _arrived(self, request_id: str, error: str | None, transfer_s: float = 0.0,
                 pages=None, layout_error: Exception | None = None) -> None:
        shards = self.arriving.pop(request_id, None)
        self._deadlines.pop(request_id, None)
        if request_id not in self.migrating:   # dropped while arriving: nothing to write
            return
        if error is not None or layout_error is not None:
            self.migrating.pop(request_id)
            self.blocks.free(request_id)
            raise KVLost(error) if layout_error is None else layout_error
        self._land(request_id, shards, transfer_s, pages)

    def _land(self, request_id: str, shards, transfer_s: float = 0.0, pages=None) -> None:
        """Write the arrived pages and start decoding the request's sequences."""
        offer, began, skipped = self.migrating.pop(request_id)
        table = self.blocks.tables[request_id]
        try:
            nbytes = land_shards(self.runner, shards, table[skipped:], pages) if shards else 0
        except Exception:
            self.blocks.free(request_id)
            raise
        self.blocks.register(request_id, offer.spec.prompt_token_ids, offer.spec.cache_salt)
        self.migrated["migration_blocks_skipped"] += skipped
        self.migrated["migration_bytes_saved"] += skipped * self.runner.bytes_per_page
        now = time.perf_counter()
        self._events.append(LifetimeEvent(request_id, "migration_end", now))
        self._migrations.append((nbytes, now - began, transfer_s))
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
