"""What the engine keeps of each request for its caller: tokens received, text, stop strings,
lifetime events, and the outputs handed to the caller's stream or callback.

Only the engine's router thread touches a TrackedRequest. The outputs it delivers refer to
its sequences' token, log-probability and timestamp lists, which callers read from their own
threads: those lists are only ever appended to, and an output reads its own prefix of them.
Instances own the request's scheduling state; this is the caller-facing copy built from their
messages. A request with n / best_of > 1 has one SequenceState per sequence sampled from its
prompt.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from dsjax.engine.request import CompletionOutput, RequestOutput, SequenceHistory
from dsjax.engine.stopping import StopChecker

log = logging.getLogger("dsjax")


class SequenceState:
    """One sequence's tokens, text and stop strings, as delivered. While a stop string could
    still be completing, its first characters are held back (vLLM's rule): a streamed delta
    never carries text the final output does not."""

    def __init__(self, index: int, params, detokenizer, eos_token_id):
        self.index = index
        self.detokenizer = detokenizer
        self.stop_checker = StopChecker(params, eos_token_id)
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._text: str | None = "" if detokenizer is not None else None
        self._emitted = 0           # characters of _text delivered so far
        # Only ever appended to: outputs refer to them instead of copying (SequenceHistory).
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.timestamps: list[float] = []
        self._history = SequenceHistory(self.token_ids, self.logprobs, self.timestamps)
        self.cumulative_logprob = 0.0
        self.finished = False
        self.finish_reason: str | None = None
        self.new_ids: list[int] = []

    @property
    def text(self) -> str | None:
        """The text the caller may see so far (all of it once finished)."""
        if self._text is None or self.finished:
            return self._text
        return self._text[:max(self._emitted, len(self._text) - self._holdback)]

    def add(self, token_id: int, logprob: float, top: dict[int, float] | None,
            timestamp: float, finish_reason: str | None) -> bool:
        """Record one token (`top`: its {token: logprob} when asked for; `finish_reason`: the
        instance's, on its last token); returns True when a stop string ended the sequence
        here (before the instance decided it was done)."""
        self.token_ids.append(token_id)
        self.timestamps.append(timestamp)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top or {})
        self.new_ids.append(token_id)
        if self.detokenizer is not None:
            self._text += self.detokenizer.feed(token_id)
            cut = (self.stop_checker.check_text(self._text, len(self.token_ids))
                   if self.stop_checker.has_stop_strings else None)
            if cut is not None:
                self._text = self._text[:cut]
                self.end("stop")
                return finish_reason is None
        if finish_reason is not None:
            self.end(finish_reason)
        return False

    def end(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason
        if self.detokenizer is not None and reason != "stop":
            self._text += self.detokenizer.flush()

    def output(self, index: int) -> CompletionOutput:
        """This sequence as returned (at position `index` among the returned ones), with what
        it added since the last output."""
        text = self.text
        new_text = None if text is None else text[self._emitted:]
        if text is not None:
            self._emitted = len(text)
        out = CompletionOutput(
            index=index, text=text, finish_reason=self.finish_reason,
            cumulative_logprob=self.cumulative_logprob, new_token_ids=self.new_ids,
            new_text=new_text, history=self._history, length=len(self.token_ids))
        self.new_ids = []
        return out


class TrackedRequest:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params, deliver: Callable, stream: bool, make_detokenizer: Callable,
                 eos_token_id: int | None, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stream = stream
        self._deliver = deliver
        self.sequences = [SequenceState(i, params, make_detokenizer(), eos_token_id)
                          for i in range(params.num_samples)]
        self.internal_id = request_id   # the engine's own id (Engine.add_request sets it)
        self.stopped: set[int] = set()  # sequences a stop string ended here
        self._newly_stopped: list[int] = []   # of those, not yet returned by deliver()
        self.spec = None                # what was sent to the instances (Engine sets it)
        # The engine's ids under which instances run it -> the sequence each runs (None: the
        # whole request; after a recompute, one id per resumed sequence), and where each is.
        self.parts: dict[str, int | None] = {}
        self.where: dict[str, set[str]] = {}
        self.recomputed = 0
        self.prefilled_on: str | None = None   # the prefill instance whose KV it was offered
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.num_cached_tokens = 0
        self.events: list[dict] = [{"timestamp": time.perf_counter() if arrival_time is None
                                    else arrival_time, "event_type": "issued"}]
        self.finished = False
        self.finish_reason: str | None = None   # "abort" / "error" for the whole request
        # Router bookkeeping: whether its prompt is still in the admission queue, and the KV
        # weight it adds to its decode instance's load.
        self.queued = False
        self.decode_weight = 0

    @property
    def location(self) -> set[str]:
        """Instances holding any of its state."""
        return set().union(*self.where.values()) if self.where else set()

    @property
    def has_tokens(self) -> bool:
        return any(s.token_ids for s in self.sequences)

    def add_event(self, event_type: str, timestamp: float) -> None:
        """Each lifetime event once (sequences of one request report the same events)."""
        if all(e["event_type"] != event_type for e in self.events):
            self.events.append({"timestamp": timestamp, "event_type": event_type})

    def add_token(self, index: int, token_id: int, logprob: float,
                  top: dict[int, float] | None, timestamp: float,
                  finish_reason: str | None) -> None:
        """Record one token of sequence `index` (in order); deliver() hands them out."""
        seq = self.sequences[index]
        if not seq.finished and seq.add(token_id, logprob, top, timestamp, finish_reason):
            self._newly_stopped.append(index)

    def deliver(self) -> list[int]:
        """After a report's tokens: end the request if every sequence has, deliver its output
        (each report's, when streaming). Returns the sequences a stop string ended here since
        the last call (the instance must be told to drop them)."""
        stopped, self._newly_stopped = self._newly_stopped, []
        if all(s.finished for s in self.sequences):
            self.finished = True
            self.add_event("decoding_end", max((s.timestamps[-1] for s in self.sequences
                                                if s.timestamps), default=time.perf_counter()))
        if self.finished or self.stream:
            self._emit()
        return stopped

    def abort(self) -> None:
        """The caller or the engine gave up on it: a final output with finish_reason abort."""
        self.finished, self.finish_reason = True, "abort"
        for seq in self.sequences:
            if not seq.finished:
                seq.finished, seq.finish_reason = True, "abort"
        self._emit()

    def fail(self, error: BaseException) -> None:
        """It failed inside the engine: the caller's stream raises this error."""
        self.finished, self.finish_reason = True, "error"
        self._call(error)

    def returned(self) -> list[SequenceState]:
        """The sequences the caller gets: all n; with best_of > n (never streamed, so only
        once finished) the n of highest cumulative log-probability, best first."""
        if len(self.sequences) == self.params.n:
            return self.sequences
        return sorted(self.sequences, key=lambda s: -s.cumulative_logprob)[:self.params.n]

    def _emit(self) -> None:
        outputs = [s.output(i) for i, s in enumerate(self.returned())]
        first = outputs[0]
        finish = self.finish_reason or first.finish_reason
        self._call(RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, text=first.text, finished=self.finished,
            finish_reason=finish if self.finished else None,
            new_token_ids=first.new_token_ids, new_text=first.new_text,
            lifetime_events=list(self.events) if self.finished else [],
            prompt_logprobs=self.prompt_logprobs, outputs=outputs,
            num_cached_tokens=self.num_cached_tokens))

    def _call(self, output) -> None:
        try:
            self._deliver(output)
        except Exception:  # noqa: BLE001 - a broken consumer must not take the engine down
            log.exception("output callback of %s failed", self.request_id)
