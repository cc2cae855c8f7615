"""The prefill role: runs prompt batches and holds each prefilled request's KV until a decode
instance pulls it."""
from __future__ import annotations

from dsjax.engine.messages import KVReady, KVRefused, MigrationOffer
from dsjax.engine.request import Request, Status
from dsjax.engine.scheduler import BatchLimits, PrefillScheduler
from dsjax.engine.worker import InstanceWorker


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
