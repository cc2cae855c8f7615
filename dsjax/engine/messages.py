"""Every message between the engine and its instances. Plain, immutable, picklable data.

Each request has one owner at a time: the prefill instance that holds it, then the decode
instance that pulled it. Nobody else touches its state; they ask the owner by message.

    caller ---AddRequest/AbortRequest---> engine router ---> instance inbox
    instance ---Report (tokens, events, offers, failures, stats)---> engine router
    prefill --Report.prefilled--> router --OfferMigration--> decode        (the decode instance
    decode --ExportKV--> prefill --KVReady | KVRefused--> decode            pulls when it has room)

Peer messages (ExportKV, KVReady, KVRefused) travel as `PeerMessage(dest, ...)` through the
router, which forwards them and so always knows where each request lives.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from dsjax.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """What an instance needs to run a request."""
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    # Salts the request's prefix-cache keys: only requests with the same salt share cached
    # blocks (vLLM's cache_salt: tenants that must not observe each other's prompts).
    cache_salt: str | None = None
    # A sequence recomputed after its instance died: the tokens it had generated, which end
    # prompt_token_ids (their KV is computed with the prompt's) and count as its output.
    prior_output: tuple[int, ...] = ()


# ---- engine -> instance -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AddRequest:
    spec: RequestSpec


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    """Drop the request (every sequence of it, or only sequence `index`) and free what it
    holds here: an abort, a stop string, a failure."""
    request_id: str
    index: int | None = None


@dataclasses.dataclass(frozen=True)
class MigrationOffer:
    """A prefilled request whose KV waits in `source`'s pages for a decode instance: its
    prompt, and (sequence index, tokens so far) of each of its unfinished sequences (one,
    or several forked from the prompt for n / best_of)."""
    spec: RequestSpec
    samples: tuple[tuple[int, tuple[int, ...]], ...]
    source: str

    @property
    def num_cached_tokens(self) -> int:
        return len(self.spec.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class OfferMigration:
    offer: MigrationOffer


@dataclasses.dataclass(frozen=True)
class Shutdown:
    pass


# ---- instance <-> instance (through the router) -------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExportKV:
    """decode -> prefill: send me this request's pages (I have allocated room for them),
    all but the first `skip_blocks`, which my prefix cache holds already."""
    request_id: str
    dest: str
    skip_blocks: int = 0


@dataclasses.dataclass(frozen=True)
class KVReady:
    """prefill -> decode: the pages, exported (the prefill side has freed its own copy)."""
    request_id: str
    payload: Any   # transport-specific: device arrays in one process, a transfer id across


@dataclasses.dataclass(frozen=True)
class KVRefused:
    """prefill (or the router, for a dead instance) -> decode: the request is gone."""
    request_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PeerMessage:
    dest: str
    message: Any


# ---- instance -> engine -------------------------------------------------------------------

class StepTokens(NamedTuple):
    """Tokens one step (or one call of recording) sampled, as columns: row i is sequence
    `indexes[i]` of request `request_ids[i]`. One entry per step, not one object per token
    (a batch of 256 rows is a handful of tuples, not 256 objects to build, send and group)."""
    request_ids: tuple[str, ...]
    indexes: tuple[int, ...]            # the sequence (0 unless n / best_of > 1)
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]         # of each chosen token (ranks best_of sequences)
    # Per row, the chosen token's and the top-N {token: logprob}, or None where not asked;
    # None for the whole step when no row asked.
    top_logprobs: tuple[dict[int, float] | None, ...] | None
    finish_reasons: dict[int, str]      # row -> "stop" | "length", on a sequence's last token
    timestamp: float                    # when the host recorded them (perf_counter)


@dataclasses.dataclass(frozen=True)
class LifetimeEvent:
    request_id: str
    event_type: str
    timestamp: float


@dataclasses.dataclass(frozen=True)
class RequestFailed:
    request_id: str
    error: str
    retryable: bool = False   # its KV was lost, not its input: recomputing it may succeed


@dataclasses.dataclass(frozen=True)
class Report:
    """One loop iteration's news from an instance (one queue operation per step)."""
    instance: str
    tokens: tuple[StepTokens, ...] = ()
    events: tuple[LifetimeEvent, ...] = ()
    prefilled: tuple[MigrationOffer, ...] = ()
    failed: tuple[RequestFailed, ...] = ()
    # (bytes, seconds from asking to landing, seconds of the transfer alone) of finished pulls
    migrations: tuple[tuple[int, float, float], ...] = ()
    stats: dict | None = None                        # a fresh snapshot when anything changed
    # (request id, one {token: logprob} per prompt token after the first), when asked for
    prompt_logprobs: tuple[tuple[str, tuple[dict[int, float], ...]], ...] = ()
    # (request id, prompt tokens whose KV came from the prefix cache), once per prefill
    cached_tokens: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class InstanceReady:
    instance: str
    role: str
    num_blocks: int          # device KV pages
    block_size: int
    transfer_address: str | None = None
    stats: dict | None = None


@dataclasses.dataclass(frozen=True)
class InstanceFailed:
    """A device or runtime fault: the instance has stopped and failed its own requests."""
    instance: str
    error: str
