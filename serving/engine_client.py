"""The bridge between the engine's threads and aiohttp handlers: tokenizing, admission,
streaming, abort.

One HTTP request becomes a RequestGroup of engine requests (one per prompt of a batch). Engine
threads call each request's callback with its outputs; they hop onto the event loop through
the client's LoopMailbox (one wake-up per burst), so handlers read one asyncio.Queue per
group. A handler that leaves the group before its requests finished (client gone, handler
cancelled) aborts them, which frees their blocks.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import uuid
from typing import AsyncIterator

from dsjax.engine.request import RequestOutput
from dsjax.sampling_params import SamplingParams
from serving.admission import Admission
from serving.api_errors import ApiError
from serving.loop_mailbox import LoopMailbox
from serving.metrics import ServerMetrics

# Longer texts are tokenized on a worker thread (BPE runs at about 7 MB/s: the longest text
# that can fit the context, ~256 kB for OPT, takes ~35 ms). Shorter ones are cheaper to
# tokenize than to hand over.
OFF_LOOP_CHARS = 16 << 10
INSTANCE_FAILURE_GRACE_S = 0.5   # how long a failed request waits for its instance's death


class EngineFailure(RuntimeError):
    """The engine failed a request: `status` 500 when the request itself broke (the engine
    serves on), 503 when an instance stopped under it (`retry_after` 1: another instance
    serves a retry; None: none is left, the server cannot serve any more)."""

    def __init__(self, message: str, status: int = 500, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def failed_instances(engine) -> frozenset[str]:
    return frozenset(name for name, state in engine.health()["instances"].items()
                     if state != "ok")


def served_times(output: RequestOutput) -> tuple[float | None, float | None]:
    """(TTFT, TPOT) a finished request was served in, by the engine's clock: arrival to first
    token, and its slowest sequence's mean gap (None where it has no such time)."""
    issued = next((e["timestamp"] for e in output.lifetime_events
                   if e["event_type"] == "issued"), None)
    firsts = [s.token_timestamps[0] for s in output.outputs if s.token_timestamps]
    ttft = min(firsts) - issued if issued is not None and firsts else None
    gaps = [(s.token_timestamps[-1] - s.token_timestamps[0]) / (len(s.token_timestamps) - 1)
            for s in output.outputs if len(s.token_timestamps) > 1]
    return ttft, max(gaps, default=None)


class EngineClient:
    def __init__(self, engine, admission: Admission, metrics: ServerMetrics):
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self._active: dict[str, "RequestGroup"] = {}   # engine request id -> its group
        self._rows: dict[str, int] = {}                # engine request id -> its sequences
        self.num_rows = 0                              # sequences admitted and not finished
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._mailbox: LoopMailbox | None = None   # made on the server's loop, on first use

    def mailbox(self) -> LoopMailbox:
        """Where engine threads post this server's outputs (the running loop's)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = LoopMailbox(loop)
        return self._mailbox

    @property
    def num_active(self) -> int:
        """Engine requests admitted and not finished (what --max-queue bounds)."""
        return len(self._active)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, on the caller's thread."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids",
                           param="prompt")
        return tokenizer.encode(text, add_bos=add_special_tokens)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        encode = functools.partial(self.encode, text, add_special_tokens)
        if len(text) <= OFF_LOOP_CHARS:
            return encode()
        return await asyncio.get_running_loop().run_in_executor(None, encode)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams],
               id_prefix: str, stream: bool = True,
               cache_salt: str | None = None) -> "RequestGroup":
        """Admit every prompt (token ids) or none: ApiError 400 (the engine refused one) or 503.
        stream False: the engine delivers only each request's final output. cache_salt: the
        prefix-cache salt of every prompt (vLLM's field)."""
        estimate = self.admission.check(len(self._active), self.num_rows,
                                        [len(p) for p in prompts],
                                        sum(p.num_samples for p in params),
                                        max(p.max_tokens for p in params))
        group = RequestGroup(self, f"{id_prefix}-{self._prefix}-{next(self._ids)}", len(prompts))
        group.estimate = estimate
        try:
            for index, (ids, sampling) in enumerate(zip(prompts, params)):
                request_id = group.request_ids[index]
                self.engine.add_request(ids, sampling, request_id=request_id, stream=stream,
                                        on_output=functools.partial(group.deliver, index),
                                        cache_salt=cache_salt)
                self._active[request_id] = group
                self._rows[request_id] = sampling.num_samples
                self.num_rows += sampling.num_samples
        except ValueError as e:          # the engine names what is wrong with the input
            group.abort()
            where = f"prompt {index}: " if len(prompts) > 1 else ""
            raise ApiError(400, f"{where}{e}", param="prompt") from e
        except RuntimeError as e:        # the engine stopped or failed
            group.abort()
            raise self.admission.engine_failed() or ApiError(
                503, f"engine unavailable: {e}", {"Retry-After": "1"}) from e
        return group

    async def failure(self, error: BaseException, failed_before: frozenset[str]
                      ) -> EngineFailure:
        """What a request the engine failed with `error` answers: 503 when an instance failed
        since it was admitted (the engine failed it for that), else 500. A dying instance
        reports its requests' failures before its own, so its death may take a moment to
        show in health()."""
        for _ in range(round(INSTANCE_FAILURE_GRACE_S / 0.02)):
            if not self.engine.health()["ok"]:
                return EngineFailure(f"engine failed: {error}: no instance is left for a "
                                     f"phase, the server cannot serve any more; restart it", 503)
            if failed_instances(self.engine) - failed_before:
                return EngineFailure(f"engine failed: {error}: an instance stopped while "
                                     f"serving this request; retry, another instance serves "
                                     f"it", 503, 1)
            await asyncio.sleep(0.02)
        return EngineFailure(f"engine failed: {error}")

    def finished(self, request_id: str, reason: str, output: RequestOutput | None) -> None:
        group = self._active.pop(request_id, None)
        if group is None:
            return
        self.num_rows -= self._rows.pop(request_id)
        self.metrics.observe_finished(reason, output)
        if output is not None and reason in ("stop", "length"):
            estimator = self.admission.estimator
            estimator.finished([s.token_timestamps for s in output.outputs])
            if group.estimate is not None:
                estimator.calibrate(group.estimate, *served_times(output))

    def abort_all(self) -> None:
        for group in set(self._active.values()):
            group.abort()


class RequestGroup:
    """The engine requests of one HTTP request. Use it as a context manager: leaving the block
    before they finished (client gone, handler cancelled) aborts them."""

    def __init__(self, client: EngineClient, group_id: str, size: int):
        self.client = client
        self.id = group_id
        self.request_ids = [group_id] if size == 1 else [f"{group_id}-{i}" for i in range(size)]
        self.final: list[RequestOutput | None] = [None] * size
        self.estimate = None       # what admission estimated it would take (load_estimate.py)
        self.failed_before = failed_instances(client.engine)
        self._mailbox = client.mailbox()
        self._queue: asyncio.Queue = asyncio.Queue()

    def __enter__(self) -> "RequestGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def deliver(self, index: int, output) -> None:
        """The engine's callback (from its threads): a RequestOutput, or the Exception that
        failed this request."""
        self._mailbox.post(self._queue, (index, output))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as they come, until every request finished; raises
        EngineFailure (500 or 503) when the engine failed one."""
        while None in self.final:
            index, output = await self._queue.get()
            request_id = self.request_ids[index]
            if isinstance(output, BaseException):
                self.client.finished(request_id, "error", None)
                raise await self.client.failure(output, self.failed_before) from output
            if output.finished:
                self.final[index] = output
                self.client.finished(request_id, output.finish_reason, output)
            yield index, output

    async def results(self) -> list[RequestOutput]:
        async for _ in self.outputs():
            pass
        return self.final

    def abort(self) -> None:
        """Stop the unfinished requests in the engine and free their blocks (a request the
        engine failed too: aborting one it already dropped is a no-op)."""
        for request_id, final in zip(self.request_ids, self.final):
            if final is None:
                self.client.engine.abort(request_id)
                self.client.finished(request_id, "abort", None)
