"""What the engine keeps of each request for its caller: tokens received, text, stop strings,
lifetime events, and the outputs handed to the caller's stream or callback.

Only the engine's router thread touches a TrackedRequest. Instances own the request's
scheduling state; this is the caller-facing copy built from their messages.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from dsjax.engine.messages import TokenUpdate
from dsjax.engine.request import RequestOutput
from dsjax.engine.stopping import StopChecker

log = logging.getLogger("dsjax")


class TrackedRequest:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params, deliver: Callable, stream: bool, detokenizer,
                 eos_token_id: int | None, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stream = stream
        self._deliver = deliver
        self.detokenizer = detokenizer
        self.stop_checker = StopChecker(params, eos_token_id)
        self.text: str | None = "" if detokenizer is not None else None
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.timestamps: list[float] = []
        self.events: list[dict] = [{"timestamp": time.perf_counter() if arrival_time is None
                                    else arrival_time, "event_type": "issued"}]
        self.finished = False
        self.finish_reason: str | None = None
        # Router bookkeeping: instances holding any of its state, whether its prompt is still
        # in the admission queue, and the KV weight it adds to its decode instance's load.
        self.location: set[str] = set()
        self.queued = False
        self.decode_weight = 0

    def add_event(self, event_type: str, timestamp: float) -> None:
        self.events.append({"timestamp": timestamp, "event_type": event_type})

    def add_tokens(self, updates: list[TokenUpdate]) -> bool:
        """Record tokens in order, detokenize, apply stop strings, deliver. Returns True when
        a stop string ended the request here (the instance must be told to drop it)."""
        new_ids: list[int] = []
        new_text = "" if self.text is not None else None
        stopped_by_text = False
        for u in updates:
            self.token_ids.append(u.token_id)
            self.timestamps.append(u.timestamp)
            if self.logprobs is not None:
                self.logprobs.append(u.logprobs or {})
            new_ids.append(u.token_id)
            if self.detokenizer is not None:
                piece = self.detokenizer.feed(u.token_id)
                self.text += piece
                new_text += piece
                cut = (self.stop_checker.check_text(self.text, len(self.token_ids))
                       if self.stop_checker.has_stop_strings else None)
                if cut is not None:
                    emitted = len(self.text) - len(new_text)
                    self.text = self.text[:cut]
                    new_text = self.text[emitted:] if cut > emitted else ""
                    self._end("stop")
                    stopped_by_text = u.finish_reason is None
                    break
            if u.finish_reason is not None:
                self._end(u.finish_reason)
                break
        if self.finished and self.detokenizer is not None and self.finish_reason != "stop":
            tail = self.detokenizer.flush()
            self.text += tail
            new_text += tail
        if self.finished or self.stream:
            self._emit(new_ids, new_text)
        return stopped_by_text

    def _end(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason
        if not self.events or self.events[-1]["event_type"] != "decoding_end":
            self.add_event("decoding_end", self.timestamps[-1] if self.timestamps
                           else time.perf_counter())

    def abort(self) -> None:
        """The caller or the engine gave up on it: a final output with finish_reason abort."""
        self.finished = True
        self.finish_reason = "abort"
        self._emit([], "" if self.text is not None else None)

    def fail(self, error: BaseException) -> None:
        """It failed inside the engine: the caller's stream raises this error."""
        self.finished = True
        self.finish_reason = "error"
        self._call(error)

    def _emit(self, new_ids: list[int], new_text: str | None) -> None:
        self._call(RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, token_ids=list(self.token_ids),
            text=self.text, finished=self.finished,
            finish_reason=self.finish_reason if self.finished else None,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            new_token_ids=new_ids, new_text=new_text,
            token_timestamps=list(self.timestamps),
            lifetime_events=list(self.events) if self.finished else []))

    def _call(self, output) -> None:
        try:
            self._deliver(output)
        except Exception:  # noqa: BLE001 - a broken consumer must not take the engine down
            log.exception("output callback of %s failed", self.request_id)
