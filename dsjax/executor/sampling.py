"""On-device batched sampler: one row per sequence, each row with its own parameters.

One compiled program per batch size, whatever the rows ask for: greedy, temperature, top-k and
top-p are chosen per row at run time; the top-N log-probabilities are computed only when some
row asks (a run-time branch); penalties, `logit_bias` and the `min_tokens` ban of stop ids read
a device-resident table of per-sequence state (`SlotTable`), addressed by each row's slot, so
neither a history length nor a bias width is ever a shape.

Log-probabilities returned are those of the model's distribution (log_softmax of the raw
logits), before penalties, temperature, top-k and top-p, as vLLM returns them by default.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.executor.batch import SamplingColumns
from dsjax.models.weights import mix32
from dsjax.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams

SAMPLING_MODES = ("greedy", "temperature", "mixed", "auto")
# Prompt scoring computes logits for this many tokens at a time: [tile, vocab] stays small.
SCORE_TILE = 128


_K = MAX_LOGIT_BIAS


@flax.struct.dataclass
class SlotTable:
    """Per-sequence sampling state on the device, one row per slot (a sequence holds a slot
    while it runs with penalties, a logit bias or a min_tokens ban of stop ids).

    counts: how often each token was generated; in_prompt: which tokens the prompt holds (for
    the repetition penalty). A slot's settings are packed in one int and one float array
    (every step takes and donates the table: two arguments instead of seven), read through
    the properties below; the bias and ban lists are padded with -1."""
    counts: jax.Array        # [N, V] i32
    in_prompt: jax.Array     # [N, V] bool
    ints: jax.Array          # [N, 2K + 1] i32: bias ids, ban ids, min_tokens
    floats: jax.Array        # [N, 3 + K] f32: presence, frequency, repetition, bias values

    @property
    def bias_ids(self) -> jax.Array:     # [N, K]
        return self.ints[:, :_K]

    @property
    def ban_ids(self) -> jax.Array:      # [N, K], the stop ids
        return self.ints[:, _K:2 * _K]

    @property
    def min_tokens(self) -> jax.Array:   # [N]: stop ids are banned while fewer were generated
        return self.ints[:, 2 * _K]

    @property
    def presence(self) -> jax.Array:     # [N]
        return self.floats[:, 0]

    @property
    def frequency(self) -> jax.Array:    # [N]
        return self.floats[:, 1]

    @property
    def repetition(self) -> jax.Array:   # [N], 1 = off
        return self.floats[:, 2]

    @property
    def bias_values(self) -> jax.Array:  # [N, K]
        return self.floats[:, 3:]

    @classmethod
    def zeros(cls, num_slots: int, vocab: int) -> "SlotTable":
        ints = jnp.full((num_slots, 2 * _K + 1), -1, jnp.int32).at[:, 2 * _K].set(0)
        floats = jnp.zeros((num_slots, 3 + _K), jnp.float32).at[:, 2].set(1.0)
        return cls(counts=jnp.zeros((num_slots, vocab), jnp.int32),
                   in_prompt=jnp.zeros((num_slots, vocab), bool), ints=ints, floats=floats)


def slot_inputs(params: SamplingParams, prompt: Sequence[int], output: Sequence[int],
                max_len: int) -> dict[str, np.ndarray]:
    """Host arrays that fill one SlotTable row (fixed shapes: one program for every request)."""
    if len(prompt) + len(output) > max_len:
        raise ValueError(f"a sequence of {len(prompt)} prompt + {len(output)} output tokens "
                         f"exceeds the {max_len} tokens a request may hold")
    k = MAX_LOGIT_BIAS
    prompt_ids = np.full(max_len, -1, np.int32)
    if params.repetition_penalty != 1.0:
        prompt_ids[:len(prompt)] = prompt
    output_ids = np.full(max_len, -1, np.int32)
    output_ids[:len(output)] = output
    bias_ids = np.full(k, -1, np.int32)
    bias_values = np.zeros(k, np.float32)
    bias_ids[:len(params.logit_bias)] = [t for t, _ in params.logit_bias]
    bias_values[:len(params.logit_bias)] = [v for _, v in params.logit_bias]
    ban_ids = np.full(k, -1, np.int32)
    if params.min_tokens:
        ban_ids[:len(params.stop_token_ids)] = params.stop_token_ids[:k]
    return dict(prompt_ids=prompt_ids, output_ids=output_ids,
                scalars=np.array([params.presence_penalty, params.frequency_penalty,
                                  params.repetition_penalty], np.float32),
                bias_ids=bias_ids, bias_values=bias_values,
                min_tokens=np.array(params.min_tokens, np.int32), ban_ids=ban_ids)


def fill_slot(table: SlotTable, slot, prompt_ids, output_ids, scalars, bias_ids, bias_values,
              min_tokens, ban_ids) -> SlotTable:
    """Overwrite one slot's row (jittable; ids of -1 are padding)."""
    vocab = table.counts.shape[1]
    drop = lambda ids: jnp.where(ids < 0, vocab, ids)   # noqa: E731 - out of range: dropped
    counts = jnp.zeros(vocab, jnp.int32).at[drop(output_ids)].add(1, mode="drop")
    in_prompt = jnp.zeros(vocab, bool).at[drop(prompt_ids)].set(True, mode="drop")
    ints = jnp.concatenate([bias_ids, ban_ids, jnp.reshape(min_tokens, 1)]).astype(jnp.int32)
    floats = jnp.concatenate([scalars, bias_values]).astype(jnp.float32)
    return table.replace(
        counts=table.counts.at[slot].set(counts), in_prompt=table.in_prompt.at[slot].set(in_prompt),
        ints=table.ints.at[slot].set(ints), floats=table.floats.at[slot].set(floats))


def record_tokens(table: SlotTable, slots: jax.Array, tokens: jax.Array) -> SlotTable:
    """Count each row's sampled token in its slot (rows without a slot touch nothing)."""
    rows = jnp.where(slots >= 0, slots, table.counts.shape[0])
    return table.replace(counts=table.counts.at[rows, tokens].add(1, mode="drop"))


@flax.struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters; padding rows hold any valid values."""
    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array        # [B] i32, 0 = off
    top_p: jax.Array        # [B] f32, 1 = off
    seeds: jax.Array        # [B] u32, per-request seed
    steps: jax.Array        # [B] i32, tokens already generated by the request
    banned: jax.Array       # [B, E] i32, tokens this row may not pick now (the eos ids
                            # before min_tokens), -1 for none
    slots: jax.Array        # [B] i32, the row's SlotTable row, -1 for none
    want_top: jax.Array     # [] i32, 1 when some row asks for top-N log-probabilities


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array        # [B] i32
    logprob: jax.Array       # [B] f32, chosen token under the model's distribution
    top_ids: jax.Array       # [B, N] i32, the N most likely tokens, most likely first
    top_logprobs: jax.Array  # [B, N] f32
    # Prompt scoring (prefill): per packed token t, the log-probability of token t+1 and the N
    # most likely next tokens.
    next_logprob: jax.Array | None = None      # [T] f32
    next_top_ids: jax.Array | None = None      # [T, N] i32
    next_top_logprobs: jax.Array | None = None  # [T, N] f32


def score_prompt(logits_fn, hidden: jax.Array, tokens: jax.Array,
                 num_logprobs: int = MAX_LOGPROBS):
    """Per token of a packed prompt axis: log p(next token) and the top-N next tokens, under the
    model's raw distribution, SCORE_TILE tokens at a time (never [T, vocab] at once).
    `logits_fn` maps hidden states [n, h] to logits [n, V]. The last token of each prompt scores
    whatever follows it on the axis; callers keep only positions inside one prompt."""
    t = hidden.shape[0]
    tile = min(SCORE_TILE, t)
    pad = -t % tile
    following = jnp.pad(jnp.roll(tokens, -1), (0, pad)).reshape(-1, tile)
    tiles = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, tile, hidden.shape[-1])

    def one(args):
        h, nxt = args
        log_probs = jax.nn.log_softmax(logits_fn(h).astype(jnp.float32), axis=-1)
        next_lp = jnp.take_along_axis(log_probs, nxt[:, None], axis=-1)[:, 0]
        top_lps, top_ids = jax.lax.top_k(log_probs, num_logprobs)
        return next_lp, top_ids.astype(jnp.int32), top_lps

    next_lp, top_ids, top_lps = jax.lax.map(one, (tiles, following))
    return (next_lp.reshape(-1)[:t], top_ids.reshape(-1, num_logprobs)[:t],
            top_lps.reshape(-1, num_logprobs)[:t])


def no_scores(t: int, num_logprobs: int = MAX_LOGPROBS):
    """What score_prompt returns when no row asked (the branch not taken)."""
    return (jnp.zeros(t, jnp.float32), jnp.zeros((t, num_logprobs), jnp.int32),
            jnp.zeros((t, num_logprobs), jnp.float32))


def build_sampling_tensors(params: Sequence[SamplingParams], seeds: Sequence[int],
                           steps: Sequence[int], pad_to: int,
                           eos_token_id: int | Sequence[int] | None = None,
                           slots: Sequence[int] | None = None) -> SamplingTensors:
    """Host-side numpy rows for `params`; rows past len(params) are greedy padding. A row
    with fewer than min_tokens generated (and not ignore_eos) may not pick an eos id (one, or
    the model's several). `slots`: each row's SlotTable row (-1 or None: none)."""
    if not len(params) == len(seeds) == len(steps):
        raise ValueError(f"params, seeds and steps must have one entry per row, got "
                         f"{len(params)}, {len(seeds)}, {len(steps)}")
    if slots is None:
        slots = [-1] * len(params)
    return sampling_tensors_of(list(zip(params, seeds, steps, slots)), pad_to, eos_token_id)


def sampling_tensors_of(rows: Sequence[tuple], pad_to: int,
                        eos_token_id: int | Sequence[int] | None = None) -> SamplingTensors:
    """build_sampling_tensors from rows of (params, seed, step, slot), such as SamplingRows."""
    if pad_to < len(rows):
        raise ValueError(f"pad_to={pad_to} is smaller than the batch of {len(rows)} rows; "
                         f"pass pad_to >= len(params)")
    return sampling_tensors(SamplingColumns.of_rows(rows), pad_to, eos_token_id)


def sampling_tensors(columns: SamplingColumns, pad_to: int,
                     eos_token_id: int | Sequence[int] | None = None) -> SamplingTensors:
    """The sampler's inputs from rows as columns, padded to pad_to rows (this runs every step:
    whole-column operations only). Padding rows: greedy, top-k off, top-p 1, no slot."""
    n = len(columns.steps)
    if pad_to < n:
        raise ValueError(f"pad_to={pad_to} is smaller than the batch of {n} rows")
    eos = () if eos_token_id is None else \
        ((eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))

    def padded(column, fill, dtype):
        out = np.full(pad_to, fill, dtype)
        out[:n] = column
        return out
    banned = np.full((pad_to, max(1, len(eos))), -1, np.int32)
    if eos:
        banned[:n][columns.steps < columns.min_tokens, :len(eos)] = eos
    return SamplingTensors(temperature=padded(columns.temperature, 0, np.float32),
                           top_k=padded(columns.top_k, 0, np.int32),
                           top_p=padded(columns.top_p, 1, np.float32),
                           seeds=padded(columns.seeds, 0, np.uint32),
                           steps=padded(columns.steps, 0, np.int32), banned=banned,
                           slots=padded(columns.slots, -1, np.int32),
                           want_top=np.array(int(columns.logprobs.any()), np.int32))


def apply_slot_state(logits: jax.Array, st: SamplingTensors, table: SlotTable) -> jax.Array:
    """Logit bias, then repetition, frequency and presence penalties (vLLM's order and
    definitions), then the min_tokens ban of stop ids, for each row that has a slot. A loop
    over those rows only: a batch without them pays one comparison."""
    batch, vocab = logits.shape
    has = st.slots >= 0
    order = jnp.argsort(jnp.logical_not(has), stable=True)   # rows with a slot first
    drop = lambda ids: jnp.where(ids < 0, vocab, ids)         # noqa: E731

    def one(i, logits):
        r = order[i]
        s = st.slots[r]
        row = logits[r].at[drop(table.bias_ids[s])].add(table.bias_values[s], mode="drop")
        counts = table.counts[s]
        generated = counts > 0
        rep = table.repetition[s]
        row = jnp.where(generated | table.in_prompt[s],
                        jnp.where(row > 0, row / rep, row * rep), row)
        row = row - table.frequency[s] * counts - table.presence[s] * generated
        banned = row.at[drop(table.ban_ids[s])].set(-jnp.inf, mode="drop")
        row = jnp.where(st.steps[r] < table.min_tokens[s], banned, row)
        return jax.lax.dynamic_update_index_in_dim(logits, row, r, 0)

    # The cond keeps a batch without slot rows from even entering the loop (whose carry, the
    # whole [B, V] logits, XLA may copy).
    return jax.lax.cond(jnp.any(has), lambda: jax.lax.fori_loop(0, has.sum(), one, logits),
                        lambda: logits)


def _row_gumbel(seeds: jax.Array, steps: jax.Array, vocab: int) -> jax.Array:
    """Gumbel noise [B, V] from a hash of (seed, step, token): a row's noise depends only on
    its own seed and step, never on its position or its batch. A counter-based hash instead of
    jax.random, whose threefry costs ~15x more per element on a CPU."""
    key = mix32(seeds.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
                 ^ mix32(steps.astype(jnp.uint32) + jnp.uint32(0x632BE5AB)))
    token = jax.lax.broadcasted_iota(jnp.uint32, (seeds.shape[0], vocab), 1)
    h = mix32(key[:, None] ^ (token * jnp.uint32(0x85EBCA77)))
    u = ((h >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))   # in (0, 1)
    return -jnp.log(-jnp.log(u))


def _first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (the first index on ties), as a max and a masked min: XLA's
    CPU variadic-reduce argmax is about twice slower."""
    top = x.max(-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, float(x.shape[-1])), -1).astype(jnp.int32)


def _bisect(lo, hi, enough, iterations: int):
    """Per row, the largest threshold in [lo, hi] for which enough(threshold) holds (enough
    must hold at lo and be monotone: true below some point, false above), to within
    (hi - lo) / 2**iterations."""
    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = enough(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    return jax.lax.fori_loop(0, iterations, body, (lo, hi))[0]


def _top_k_top_p_mask(scaled: jax.Array, st: SamplingTensors) -> jax.Array:
    """Which tokens each row's top-k and top-p keep ([B, V], vocab order), without a sort:
    thresholds found by bisection (one masked reduction per iteration). Top-k keeps every
    token tied with the k-th (as vLLM's threshold does); top-p then keeps the most likely
    tokens whose renormalised mass reaches p, at least the most likely one."""
    finite = jnp.isfinite(scaled)
    top = jnp.max(scaled, -1)
    use_k = st.top_k > 0

    def k_threshold():
        low = jnp.min(jnp.where(finite, scaled, top[:, None]), -1)
        counts = lambda t: jnp.sum(scaled >= t[:, None], -1) >= st.top_k  # noqa: E731
        return jnp.where(use_k, _bisect(low, top, counts, 20), -jnp.inf)

    k_min = jax.lax.cond(jnp.any(use_k), k_threshold, lambda: jnp.full_like(top, -jnp.inf))
    in_top_k = scaled >= k_min[:, None]
    use_p = st.top_p < 1.0

    def p_threshold():
        probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)
        mass = lambda t: jnp.sum(jnp.where(probs >= t[:, None], probs, 0.0), -1) \
            >= st.top_p  # noqa: E731
        tau = _bisect(jnp.zeros_like(top), jnp.max(probs, -1), mass, 16)
        return jnp.where(use_p, tau, 0.0), probs

    def no_p_threshold():
        return jnp.zeros_like(top), jnp.zeros_like(scaled)

    p_min, probs = jax.lax.cond(jnp.any(use_p), p_threshold, no_p_threshold)
    return in_top_k & ((probs >= p_min[:, None]) | (scaled >= top[:, None]))


def _gumbel_pick(logits: jax.Array, filtered: bool, st: SamplingTensors) -> jax.Array:
    """Gumbel-max over logits / temperature among the kept tokens (vocab order, so a seeded row
    draws the same token whether or not its batch needed filtering)."""
    safe_temp = jnp.where(st.temperature > 0, st.temperature, 1.0)[:, None]
    scaled = logits / safe_temp
    if filtered:
        scaled = jnp.where(_top_k_top_p_mask(scaled, st), scaled, -jnp.inf)
    return _first_argmax(scaled + _row_gumbel(st.seeds, st.steps, logits.shape[-1]))


def sample(logits: jax.Array, st: SamplingTensors, table: SlotTable | None = None, *,
           num_logprobs: int = MAX_LOGPROBS, mode: str = "auto") -> SampleOutput:
    """Pick one token per row of `logits` [B, V].

    mode "greedy": every row is argmax (no sort). mode "temperature": rows sample from
    softmax(logits / temperature) with no top-k / top-p anywhere in the batch (no sort).
    mode "mixed": each row follows its own temperature / top-k / top-p (one sort). Rows with
    temperature 0 get exactly the argmax in every mode, and a seeded row draws the same token
    in "temperature" and "mixed" mode. mode "auto" (the engine's) is one program that picks the
    cheapest of the three at run time from the batch's rows. `table`: the rows' slot state
    (penalties, bias, bans), applied to rows whose slot is >= 0.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    logits = logits.astype(jnp.float32)
    raw = logits   # the model's distribution, before any penalty, ban or filter
    if table is not None:
        logits = apply_slot_state(logits, st, table)
    rows = jnp.arange(logits.shape[0])[:, None]
    banned = jnp.where(st.banned < 0, logits.shape[-1], st.banned)
    logits = jax.lax.cond(jnp.any(st.banned >= 0),
                          lambda: logits.at[rows, banned].set(-jnp.inf, mode="drop"),
                          lambda: logits)
    greedy_tokens = _first_argmax(logits)

    def drawn(filtered: bool):
        return jnp.where(st.temperature > 0, _gumbel_pick(logits, filtered, st),
                         greedy_tokens).astype(jnp.int32)

    if mode == "auto":
        sampling = st.temperature > 0
        filtering = jnp.any(sampling & ((st.top_k > 0) | (st.top_p < 1.0)))
        branch = jnp.where(jnp.any(sampling), jnp.where(filtering, 2, 1), 0)
        tokens = jax.lax.switch(branch, [lambda: greedy_tokens, lambda: drawn(False),
                                         lambda: drawn(True)])
    elif mode == "greedy":
        tokens = greedy_tokens
    else:
        tokens = drawn(mode == "mixed")
    batch = logits.shape[0]
    # log-softmax only where it is read: log p = logit - logsumexp.
    top_raw = jnp.max(raw, -1)
    log_norm = top_raw + jnp.log(jnp.sum(jnp.exp(raw - top_raw[:, None]), -1))

    def top():
        values, ids = jax.lax.top_k(raw, num_logprobs)
        return ids.astype(jnp.int32), values - log_norm[:, None]

    def no_top():
        return (jnp.zeros((batch, num_logprobs), jnp.int32),
                jnp.zeros((batch, num_logprobs), jnp.float32))

    top_ids, top_logprobs = jax.lax.cond(st.want_top > 0, top, no_top) if num_logprobs \
        else no_top()
    logprob = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - log_norm
    return SampleOutput(tokens=tokens, logprob=logprob, top_ids=top_ids,
                        top_logprobs=top_logprobs)
