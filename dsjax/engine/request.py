"""A request's state inside the instance that owns it, and what callers get back (RequestOutput).

A `Request` lives in exactly one instance worker at a time and only that worker's thread (or
process) touches it. When a decode instance pulls a prefilled request it builds its own
`Request` from the offer; the prefill side's copy is dropped.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from dsjax.engine.messages import MigrationOffer, RequestSpec
from dsjax.engine.stopping import StopChecker
from dsjax.executor.batch import SamplingRow

# Lifetime events, in DistServe's order.
EVENT_TYPES = ("issued", "context_begin", "context_end", "migration_begin", "migration_end",
               "decoding_begin", "decoding_end")


class Status(enum.Enum):
    QUEUED = "queued"                  # waiting for a prefill batch (or, chunked: mid-prompt)
    WAITING_MIGRATION = "waiting_migration"  # prefilled, holding prefill blocks, not yet pulled
    MIGRATING = "migrating"            # a decode instance allocated room and asked for the KV
    DECODING = "decoding"              # in a decode scheduler (waiting or running)
    SWAPPED = "swapped"


@dataclasses.dataclass
class RequestOutput:
    """What a caller sees: the whole output so far, plus the tokens new since the last update."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[dict[int, float]] | None
    new_token_ids: list[int]
    new_text: str | None
    token_timestamps: list[float]
    lifetime_events: list[dict[str, Any]]


class Request:
    """Engine-side state of one request in its owning instance."""

    def __init__(self, spec: RequestSpec, eos_token_id: int | None,
                 output_token_ids: tuple[int, ...] = ()):
        self.spec = spec
        self.request_id = spec.request_id
        self.prompt_token_ids = spec.prompt_token_ids
        self.params = spec.params
        self.output_token_ids: list[int] = list(output_token_ids)
        self.status = Status.QUEUED
        self.num_computed = 0  # prompt tokens whose KV is cached (chunked prefill)
        self.decoding_started = False
        self.stop_checker = StopChecker(spec.params, eos_token_id)

    @classmethod
    def from_offer(cls, offer: MigrationOffer, eos_token_id: int | None) -> "Request":
        return cls(offer.spec, eos_token_id, offer.output_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(self.params, self.spec.seed, len(self.output_token_ids))

    def offer(self, source: str) -> MigrationOffer:
        return MigrationOffer(self.spec, tuple(self.output_token_ids), source)

    def __repr__(self) -> str:
        return f"Request({self.request_id}, {self.status.value}, {self.num_tokens} tokens)"
