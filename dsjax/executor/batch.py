"""Plain descriptions of one step's work: what the runner is fed instead of live requests.

The engine's workers build these from the requests they own; the profiler, replay warm-up and
benchmarks build them directly. They hold only immutable data (token ids, positions, page ids,
sampling rows), so a step can never observe a request changing under it.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple, Sequence

import numpy as np

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


class SamplingColumns(NamedTuple):
    """Sampling rows as columns, one entry per row: what the sampler's tensors are made of
    (sampling.sampling_tensors), and what a persistent decode batch carries from step to step
    (of a row that keeps running, only `steps` changes)."""
    temperature: np.ndarray   # [n] f32
    top_p: np.ndarray         # [n] f32
    top_k: np.ndarray         # [n] i32, 0: off
    seeds: np.ndarray         # [n] u32
    steps: np.ndarray         # [n] i32, tokens generated so far
    slots: np.ndarray         # [n] i32, the SlotTable row, -1: none
    min_tokens: np.ndarray    # [n] i32, eos ids banned while steps < this (0 with ignore_eos)
    logprobs: np.ndarray      # [n] i32, top-N log-probabilities asked for, 0: none

    @classmethod
    def of_rows(cls, rows: Sequence[SamplingRow]) -> "SamplingColumns":
        """One pass over the rows (any int seed maps onto the u32 key space)."""
        floats = np.array([(p.temperature, p.top_p) for p, _, _, _ in rows],
                          np.float32).reshape(-1, 2).T
        ints = np.array([(max(p.top_k, 0), seed & 0xFFFFFFFF, step, slot,
                          0 if p.ignore_eos else p.min_tokens, p.logprobs or 0)
                         for p, seed, step, slot in rows], np.int64).reshape(-1, 6).T
        return cls(floats[0], floats[1], ints[0].astype(np.int32), ints[1].astype(np.uint32),
                   ints[2].astype(np.int32), ints[3].astype(np.int32), ints[4].astype(np.int32),
                   ints[5].astype(np.int32))

    def take(self, index) -> "SamplingColumns":
        return SamplingColumns(*(column[index] for column in self))

    def put(self, index, rows: "SamplingColumns") -> None:
        for column, new in zip(self, rows):
            column[index] = new


class DecodeColumns(NamedTuple):
    """A decode step's rows as columns (what its DecodeRows say, one entry per row): the form
    the runner packs, and the one a persistent decode batch carries from step to step."""
    tokens: np.ndarray       # [n] i32 (a placeholder where prev_rows >= 0)
    positions: np.ndarray    # [n] i32
    tables: np.ndarray       # [n, W] i32, zero past each row's length
    table_lens: np.ndarray   # [n] i32
    prev_rows: np.ndarray    # [n] i32, -1: the input token is the one in `tokens`
    sampling: SamplingColumns

    @classmethod
    def of_rows(cls, rows: Sequence[DecodeRow], width: int) -> "DecodeColumns":
        """One pass over the rows for their scalars, one scatter for every block table."""
        n = len(rows)
        scalars = np.array([(r.token_id, r.position, r.prev_row) for r in rows],
                           np.int32).reshape(n, 3).T.copy()
        tables, lens = table_rows([r.block_table for r in rows], width)
        return cls(scalars[0], scalars[1], tables, lens, scalars[2],
                   SamplingColumns.of_rows([r.sampling for r in rows]))

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    def take(self, index) -> "DecodeColumns":
        """The rows at `index` (an index array copies; a slice is a view)."""
        return DecodeColumns(*(column[index] for column in self[:-1]),
                             self.sampling.take(index))

    def put(self, index, rows: "DecodeColumns") -> None:
        """Overwrite the rows at `index` with `rows`."""
        for column, new in zip(self[:-1], rows[:-1]):
            column[index] = new
        self.sampling.put(index, rows.sampling)


def table_rows(tables: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Block tables as one [n, width] array, zero past each table's length (one scatter, not
    a row at a time), and their lengths."""
    lens = np.fromiter(map(len, tables), np.int32, len(tables))
    if len(tables) and int(lens.max()) > width:
        raise ValueError(f"a decode row's block table has {int(lens.max())} pages, over the "
                         f"{width} a table holds here: raise max_num_blocks_per_req")
    out = np.zeros((len(tables), width), np.int32)
    out[np.arange(width) < lens[:, None]] = np.fromiter(itertools.chain.from_iterable(tables),
                                                        np.int32, int(lens.sum()))
    return out, lens


def needs_slot(params: SamplingParams) -> bool:
    """Whether a sequence with these parameters samples through a SlotTable row."""
    return params.has_penalties or bool(params.min_tokens and params.stop_token_ids)
