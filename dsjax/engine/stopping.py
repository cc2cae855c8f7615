"""Host-side stop conditions of one request, checked once per generated token."""
from __future__ import annotations

import dataclasses
from typing import Literal

from dsjax.sampling_params import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class StopDecision:
    finished: bool
    finish_reason: FinishReason | None
    text: str | None  # output text, cut before the stop string when one matched


class StopChecker:
    """Decides after each token whether a request is done (stateful: one per request).

    Rules, in order: nothing but max_tokens stops a request before min_tokens tokens;
    eos (unless ignore_eos), stop_token_ids and stop strings finish with "stop";
    reaching max_tokens finishes with "length".
    """

    def __init__(self, params: SamplingParams, eos_token_id: int | tuple[int, ...] | None):
        self._params = params
        if eos_token_id is None or params.ignore_eos:
            eos_token_id = ()
        # A model may end sequences with several tokens (LLaMA 3 lists three).
        self._eos = frozenset((eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id)
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._stop_strings = params.stop
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._checked_chars = 0  # text length already searched for stop strings

    def check(self, token_id: int, num_generated: int, text: str | None) -> StopDecision:
        """`num_generated` counts `token_id`; `text` is the whole output text so far or None."""
        cut = self.check_text(text, num_generated)
        if cut is not None:
            return StopDecision(True, "stop", text[:cut])
        reason = self.check_token(token_id, num_generated)
        return StopDecision(reason is not None, reason, text)

    def check_token(self, token_id: int, num_generated: int) -> FinishReason | None:
        """The conditions that need no text (the engine's hot path): eos, stop ids, length."""
        if num_generated >= self._params.min_tokens and (
                token_id in self._eos or token_id in self._stop_token_ids):
            return "stop"
        if num_generated >= self._params.max_tokens:
            return "length"
        return None

    @property
    def stop_ids(self) -> frozenset:
        """The tokens that may stop the sequence (eos unless ignored, and the stop ids): a
        token outside them stops it only by length."""
        return self._eos | self._stop_token_ids

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stop_strings)

    def check_text(self, text: str | None, num_generated: int) -> int | None:
        """Where to cut the output text if a stop string has just been completed, else None."""
        if num_generated < self._params.min_tokens:
            if text is not None:
                self._checked_chars = len(text)
            return None
        cut = self._find_stop_string(text)
        if text is not None:
            self._checked_chars = len(text)
        return cut

    def _find_stop_string(self, text: str | None) -> int | None:
        """Index of the earliest stop string that could have been completed by new text."""
        if text is None or not self._stop_strings:
            return None
        # A new match must end in the new text, so it starts at most len(stop)-1 chars earlier.
        start = max(0, min(self._checked_chars, len(text)) - self._longest_stop + 1)
        hits = [i for i in (text.find(s, start) for s in self._stop_strings) if i >= 0]
        return min(hits, default=None)
