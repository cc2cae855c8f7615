"""Plain descriptions of one step's work: what the runner is fed instead of live requests.

The engine's workers build these from the requests they own; the profiler, replay warm-up and
benchmarks build them directly. They hold only immutable data (token ids, positions, page ids,
sampling rows), so a step can never observe a request changing under it.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from dsjax.sampling_params import SamplingParams


class SamplingRow(NamedTuple):
    """How to sample one row: the request's parameters, its seed and how many tokens it has
    generated so far (which picks the row's random stream and the min_tokens eos ban). Rows
    with penalties, a logit bias or a min_tokens ban of stop ids name the row of the sampler's
    slot table that holds their state (ModelRunner.fill_sampling_slot); -1 for none.
    (Named tuples: every decode step builds one per row, at a fraction of a dataclass's cost.)"""
    params: SamplingParams
    seed: int
    step: int
    slot: int = -1


@dataclasses.dataclass(frozen=True)
class PrefillRow:
    """A whole prompt, written to `block_table`'s pages from position `start` (the tokens
    before it are cached there already: a prefix-cache hit). Its first token is sampled once
    per sampling row (several for n / best_of: the sequences' first tokens)."""
    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]
    sampling: tuple[SamplingRow, ...]
    start: int = 0


class DecodeRow(NamedTuple):
    """One new token at `position` (the cached context is positions 0..position-1). With
    prev_row >= 0 the token is the one row prev_row of the previous, uncollected step samples
    (token_id is then a placeholder)."""
    token_id: int
    position: int
    block_table: tuple[int, ...]
    sampling: SamplingRow
    prev_row: int = -1


@dataclasses.dataclass(frozen=True)
class ChunkRow:
    """Tokens continuing a cached sequence at positions start..start+len(token_ids)-1: a slice
    of a prompt (chunked prefill) or a decode row's single newest token. Sampled once per
    sampling row (a prompt's last chunk samples each of its sequences' first token)."""
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    sampling: tuple[SamplingRow, ...]


def needs_slot(params: SamplingParams) -> bool:
    """Whether a sequence with these parameters samples through a SlotTable row."""
    return params.has_penalties or bool(params.min_tokens and params.stop_token_ids)
