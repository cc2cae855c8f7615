"""A request's state inside the engine, and what callers get back (RequestOutput)."""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any, Callable

# Lifetime events, in DistServe's order.
EVENT_TYPES = ("issued", "context_begin", "context_end", "migration_begin", "migration_end",
               "decoding_begin", "decoding_end")


class Status(enum.Enum):
    QUEUED = "queued"                  # waiting for a prefill batch
    PREFILLING = "prefilling"
    WAITING_MIGRATION = "waiting_migration"  # prefilled, holding prefill blocks, not yet pulled
    MIGRATING = "migrating"
    DECODING = "decoding"              # in a decode instance (waiting or running)
    SWAPPED = "swapped"
    FINISHED = "finished"
    ABORTED = "aborted"


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
    """Mutable engine-side state. Only engine threads touch it, under the engine's locks."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 sampling_params, seed: int, arrival_time: float | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.seed = seed
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] | None = (
            [] if sampling_params.logprobs is not None else None)
        self.token_timestamps: list[float] = []
        self.text: str | None = None
        self.status = Status.QUEUED
        self.finish_reason: str | None = None
        self.num_computed = 0  # prompt tokens whose KV is cached (chunked prefill)
        self.on_output = on_output
        self.events: list[dict[str, Any]] = []
        self.add_event("issued", arrival_time)
        # Set by the engine: the detokenizer and stop checker of this request.
        self.detokenizer = None
        self.stop_checker = None
        self.prefill_instance = None  # instance holding the prompt's KV until migration
        # Delivery state, owned by the engine's output thread.
        self.stream = True           # deliver every token (False: only the final output)
        self.num_delivered = 0
        self.delivered_final = False

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

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def add_event(self, event_type: str, timestamp: float | None = None) -> None:
        self.events.append({"timestamp": time.perf_counter() if timestamp is None else timestamp,
                            "event_type": event_type})

    def to_output(self, new_token_ids: list[int], new_text: str | None,
                  upto: int) -> RequestOutput:
        """A snapshot of the first `upto` tokens (the engine may already be past them)."""
        finished = self.delivered_final
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, token_ids=self.output_token_ids[:upto],
            text=self.text, finished=finished,
            finish_reason=self.finish_reason if finished else None,
            logprobs=None if self.output_logprobs is None else self.output_logprobs[:upto],
            new_token_ids=new_token_ids, new_text=new_text,
            token_timestamps=self.token_timestamps[:upto],
            lifetime_events=list(self.events) if finished else [])

    def __repr__(self) -> str:
        return f"Request({self.request_id}, {self.status.value}, {self.num_tokens} tokens)"
