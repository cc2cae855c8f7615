"""The bridge between the engine's threads and aiohttp handlers: admission, streaming, abort.

Engine threads call `on_output` for every token; it hops onto the event loop with
`call_soon_threadsafe`, so handlers read a plain asyncio.Queue. A handler that stops reading
before the request finished (client gone, handler cancelled) aborts it, which frees its blocks.
"""
from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import AsyncIterator

from dsjax.engine.request import RequestOutput
from dsjax.sampling_params import SamplingParams
from serving.metrics import ServerMetrics


class ApiError(Exception):
    """An HTTP error answer: status, a message naming the problem and its fix, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.error_type = error_type


RETRY_AFTER_SECONDS = 1


class EngineClient:
    """Admits requests into the engine up to `max_queue` at once and streams their outputs."""

    def __init__(self, engine, max_queue: int, metrics: ServerMetrics):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.accepting = True
        self._active: dict[str, "ActiveRequest"] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    @property
    def num_active(self) -> int:
        return len(self._active)

    def submit(self, prompt: str | list[int], params: SamplingParams,
               id_prefix: str = "gen") -> "ActiveRequest":
        """Queue a request or raise ApiError (400 bad input, 503 full or stopping)."""
        if not self.accepting:
            raise ApiError(503, "server is shutting down: retry on another server",
                           {"Retry-After": str(RETRY_AFTER_SECONDS)}, "unavailable")
        if len(self._active) >= self.max_queue:
            self.metrics.rejected_overload += 1
            raise ApiError(503, f"server is at its admission bound of {self.max_queue} requests "
                                f"in flight: retry later, or start it with a larger --max-queue",
                           {"Retry-After": str(RETRY_AFTER_SECONDS)}, "overloaded")
        request_id = f"{id_prefix}-{self._prefix}-{next(self._ids)}"
        active = ActiveRequest(self, request_id)
        try:
            self.engine.add_request(prompt, params, request_id=request_id,
                                    on_output=active.deliver_threadsafe)
        except ValueError as e:          # the engine names what is wrong with the input
            raise ApiError(400, str(e)) from e
        except RuntimeError as e:        # the engine stopped or failed
            raise ApiError(503, f"engine unavailable: {e}", error_type="unavailable") from e
        self._active[request_id] = active
        return active

    def _finished(self, active: "ActiveRequest") -> None:
        self._active.pop(active.request_id, None)

    def abort_all(self) -> None:
        for active in list(self._active.values()):
            active.abort()


class ActiveRequest:
    """One admitted request: iterate its outputs. Use it as a context manager: leaving the
    block before the request finished (client gone, handler cancelled) aborts it."""

    def __init__(self, client: EngineClient, request_id: str):
        self.client = client
        self.request_id = request_id
        self.final: RequestOutput | None = None
        self._done = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def __enter__(self) -> "ActiveRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def deliver_threadsafe(self, output) -> None:
        """Called from engine threads (or from the loop itself, on abort)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, output)
        except RuntimeError:  # the loop closed: the server is gone, nobody is listening
            pass

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Each output as it comes; raises RuntimeError if the engine failed."""
        while self.final is None:
            output = await self._queue.get()
            if isinstance(output, BaseException):
                self._mark_done("error")
                raise RuntimeError(f"engine failed: {output}") from output
            if output.finished:
                self.final = output
                self._mark_done(output.finish_reason, output)
            yield output

    async def result(self) -> RequestOutput:
        async for _ in self.outputs():
            pass
        return self.final

    def abort(self) -> None:
        """Stop the request in the engine and free its blocks; no-op once it finished."""
        if not self._done:
            self.client.engine.abort(self.request_id)
            self._mark_done("abort")

    def _mark_done(self, reason: str, output: RequestOutput | None = None) -> None:
        if self._done:
            return
        self._done = True
        self.client._finished(self)
        self.client.metrics.observe_finished(reason, output)
