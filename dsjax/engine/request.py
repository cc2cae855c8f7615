"""A request's state inside the instance that owns it, and what callers get back (RequestOutput).

A `Request` lives in exactly one instance worker at a time and only that worker's thread (or
process) touches it. When a decode instance pulls a prefilled request it builds its own
`Request` from the offer; the prefill side's copy is dropped.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, NamedTuple

from dsjax.engine.messages import MigrationOffer, RequestSpec
from dsjax.engine.stopping import StopChecker
from dsjax.executor.batch import SamplingRow, needs_slot

# Lifetime events, in DistServe's order.
EVENT_TYPES = ("issued", "context_begin", "context_end", "migration_begin", "migration_end",
               "decoding_begin", "decoding_end")


class Status(enum.Enum):
    QUEUED = "queued"                  # waiting for a prefill batch (or, chunked: mid-prompt)
    WAITING_MIGRATION = "waiting_migration"  # prefilled, holding prefill blocks, not yet pulled
    MIGRATING = "migrating"            # a decode instance allocated room and asked for the KV
    DECODING = "decoding"              # in a decode scheduler (waiting or running)
    SWAPPED = "swapped"


class SequenceHistory(NamedTuple):
    """A delivered sequence's token ids, {token: logprob} tables (None when not asked for) and
    token timestamps: lists that only ever grow, so any prefix of them stays as it was."""
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    timestamps: list[float]


@dataclasses.dataclass(eq=False)
class CompletionOutput:
    """One returned sequence of a request (several with n > 1).

    token_ids, logprobs and token_timestamps are the sequence's first `length` tokens when
    this output was made, copied out of its history on first read: a streamed output costs
    O(1) to make, not a copy of everything generated so far (O(n^2) over a long stream), and
    a consumer that reads only new_token_ids / new_text never pays for the copy."""
    index: int
    text: str | None
    finish_reason: str | None
    cumulative_logprob: float
    new_token_ids: list[int]
    new_text: str | None
    history: SequenceHistory = dataclasses.field(repr=False)
    length: int = 0   # tokens of `history` this output covers

    @functools.cached_property
    def token_ids(self) -> list[int]:
        return self.history.token_ids[:self.length]

    @functools.cached_property
    def logprobs(self) -> list[dict[int, float]] | None:
        logprobs = self.history.logprobs
        return None if logprobs is None else logprobs[:self.length]

    @functools.cached_property
    def token_timestamps(self) -> list[float]:
        return self.history.timestamps[:self.length]

    @property
    def num_tokens(self) -> int:
        """len(token_ids), without copying them."""
        return self.length

    def token_at(self, position: int) -> tuple[int, float, dict[int, float] | None]:
        """(token id, timestamp, {token: logprob} or None when not asked for) of token
        `position`, read from the history without copying it (a stream reads its new tokens
        this way; it does not see a caller's own replacement of `logprobs`)."""
        if not 0 <= position < self.length:
            raise IndexError(f"token {position} of an output of {self.length} tokens")
        history = self.history
        return (history.token_ids[position], history.timestamps[position],
                None if history.logprobs is None else history.logprobs[position])

    def __getstate__(self) -> dict:
        """Pickled (and copied) as the snapshot it is: its own prefix, not the history that
        grew after it."""
        prefix = SequenceHistory(self.token_ids, self.logprobs, self.token_timestamps)
        return {**self.__dict__, "history": prefix}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(eq=False)
class RequestOutput:
    """What a caller sees: the whole output so far, plus the tokens new since the last update.
    The top-level token_ids/text/... are the first returned sequence's; `outputs` holds every
    returned sequence (n of them)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    new_token_ids: list[int]
    new_text: str | None
    lifetime_events: list[dict[str, Any]]
    outputs: list[CompletionOutput]
    # None for the first prompt token, then {token: logprob} (its own and the top-N), when
    # the request asked for prompt_logprobs.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Prompt tokens whose KV came from the prefix cache (OpenAI's usage.prompt_tokens_details).
    num_cached_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs

    @property
    def token_timestamps(self) -> list[float]:
        return self.outputs[0].token_timestamps

    @property
    def num_tokens(self) -> int:
        return self.outputs[0].num_tokens


def sequence_id(request_id: str, index: int, num_samples: int) -> str:
    """The id a sequence goes by inside an instance: the request's own id, unless the request
    decodes several sequences (n, best_of): then one id per sequence."""
    return request_id if num_samples == 1 else f"{request_id}#{index}"


def sequence_seed(seed: int, index: int) -> int:
    """Sequence i of a request draws from its own random stream (the request's seed for i=0)."""
    return seed if index == 0 else (seed * 1000003 + index * 0x9E3779B1) & 0xFFFFFFFF


class Request:
    """Engine-side state of one sequence in its owning instance. A request with n / best_of
    > 1 is one Request (index None) until its prompt is computed, then one per sequence."""

    def __init__(self, spec: RequestSpec, eos_token_id: int | None,
                 output_token_ids: tuple[int, ...] = (), index: int | None = 0):
        self.spec = spec
        self.index = index
        self.num_samples = spec.params.num_samples
        if index is None and self.num_samples == 1:
            self.index = index = 0
        self.request_id = (spec.request_id if index is None else
                           sequence_id(spec.request_id, index, self.num_samples))
        self.prompt_token_ids = spec.prompt_token_ids
        self.params = spec.params
        self.output_token_ids: list[int] = list(output_token_ids)
        self.status = Status.QUEUED
        # Prompt tokens whose KV is in this instance's pages: a prefix-cache hit, and the
        # chunks computed so far (chunked prefill).
        self.num_computed = 0
        self.num_cached_tokens = 0   # of those, how many the prefix cache supplied
        self.cache_salt = spec.cache_salt
        self.decoding_started = False
        # Tokens sampled by dispatched steps whose outputs the host has not read yet (async
        # scheduling): counted in num_tokens, not yet in output_token_ids.
        self.pending = 0
        self.stop_checker = StopChecker(spec.params, eos_token_id)
        self.eos_token_id = eos_token_id
        self.prior = len(spec.prior_output)   # generated before a recompute (see RequestSpec)
        self._detokenizer = None   # stop strings: the text decoded so far, built on first use
        self._text = ""
        # Fixed for its life, and read every decode step.
        self.seed = sequence_seed(spec.seed, self.index or 0)
        self.needs_slot = needs_slot(spec.params)
        # Its tokens need no log-probabilities and no text for stop strings.
        self.plain = spec.params.logprobs is None and not self.stop_checker.has_stop_strings
        # What a plain token is checked against (the decode loop's per-row work): the tokens
        # that may stop it, and the count of output tokens that reaches max_tokens.
        self.stop_ids = self.stop_checker.stop_ids
        self.length_at = spec.params.max_tokens - self.prior

    @classmethod
    def from_offer(cls, offer: MigrationOffer, eos_token_id: int | None) -> list["Request"]:
        """The offered request's unfinished sequences, as this instance's requests."""
        return [cls(offer.spec, eos_token_id, tokens, index) for index, tokens in offer.samples]

    def sequences(self) -> list["Request"]:
        """The sequences this request samples from its prompt: itself, or n / best_of new ones."""
        if self.index is not None:
            return [self]
        return [Request(self.spec, self.eos_token_id, (), i) for i in range(self.num_samples)]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def caches_prefix(self) -> bool:
        """Whether its prompt may start from cached blocks: not when it asks for the prompt's
        log-probabilities (every prompt token must then be computed)."""
        return self.params.prompt_logprobs is None

    def ends_on_stop_string(self, tokenizer) -> bool:
        """Whether its newest output token completes a stop string (checked here, where the
        token is produced, so every sibling of an n > 1 request ends at once)."""
        if not self.stop_checker.has_stop_strings or tokenizer is None:
            return False
        if self._detokenizer is None:   # tokens from before (a migrated or resumed sequence)
            from dsjax.tokenizer import IncrementalDetokenizer
            self._detokenizer = IncrementalDetokenizer(tokenizer,
                                                       self.params.skip_special_tokens)
            for i, token in enumerate(self.output_token_ids[:-1]):
                self._text += self._detokenizer.feed(token)
                self.stop_checker.check_text(self._text, i + 1)
        self._text += self._detokenizer.feed(self.output_token_ids[-1])
        return self.stop_checker.check_text(self._text, self.num_generated) is not None

    def kv_token_ids(self) -> tuple[int, ...]:
        """The tokens whose KV a finished sequence's pages hold: all but the last sampled."""
        return (self.prompt_token_ids + tuple(self.output_token_ids))[:-1]

    @property
    def num_generated(self) -> int:
        """Tokens it has generated, those before a recompute included."""
        return self.prior + len(self.output_token_ids)

    def penalty_history(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prompt, output) as its penalties see them: a recomputed sequence's earlier tokens
        are output, not prompt."""
        prompt = self.prompt_token_ids[:len(self.prompt_token_ids) - self.prior]
        return prompt, tuple(self.spec.prior_output) + tuple(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens (those still on the device included)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.pending

    @property
    def can_step(self) -> bool:
        """Whether another decode step may run for it: not when its last token (max_tokens)
        is already in flight."""
        return self.num_generated + self.pending < self.params.max_tokens

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def sampling_row(self, slot: int = -1) -> SamplingRow:
        return SamplingRow(self.params, self.seed, self.num_generated + self.pending, slot)

    def __repr__(self) -> str:
        return f"Request({self.request_id}, {self.status.value}, {self.num_tokens} tokens)"
