"""The attention interface the model calls, its metadata, and the XLA reference implementation.

The KV cache of one model instance is two arrays, K and V, each
    [num_layers, num_pages, page_size, num_kv_heads, head_dim]
Layers first so a layer scan indexes one contiguous slab; heads before head_dim so tensor
parallelism shards axis 3 and each device keeps whole pages of its own heads; a page is
page_size consecutive tokens of one sequence. Slot s of a layer is token (s % page_size) of
page (s // page_size). A slot >= num_pages * page_size means "write nowhere" (padding).

Backends (this XLA one, the Pallas kernels in dsjax.executor.kernels) implement `AttentionBackend`.
They receive the whole cache plus the layer index so a kernel can read the layer in place
instead of the model slicing (copying) it every step. Attention is grouped-query throughout:
query head h reads KV head h // (num_heads / num_kv_heads). A model with a sliding window
(Mistral) passes `window`: a query at position p then sees keys at positions p - window + 1
... p (transformers' definition).
"""
from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct

# Large negative instead of -inf keeps fully-masked padding rows NaN-free.
MASK_VALUE = -1e30


@struct.dataclass
class PrefillMetadata:
    """A packed batch of whole prompts on one token axis of length T (a bucket >= real tokens).

    Prompt i holds tokens cu_seqlens[i]:cu_seqlens[i+1]; padding tokens (past cu_seqlens[-1])
    carry seq_ids == -1 and a slot that writes nowhere. Padding sequences have zero length.
    """
    positions: jax.Array      # [T] int32, position within its prompt (0-based)
    seq_ids: jax.Array        # [T] int32, index of the prompt, -1 for padding
    cu_seqlens: jax.Array     # [B+1] int32, cumulative prompt lengths
    slot_mapping: jax.Array   # [T] int32, cache slot each token's K/V is written to
    last_token_idx: jax.Array  # [B] int32, index on the token axis of each prompt's last token


@struct.dataclass
class DecodeMetadata:
    """One new token per sequence; padding rows have context_len 0."""
    positions: jax.Array      # [B] int32, position of the new token
    slot_mapping: jax.Array   # [B] int32
    block_tables: jax.Array   # [B, W] int32, page ids of each sequence (unused entries: any page)
    context_lens: jax.Array   # [B] int32, tokens to attend to, the new one included


@struct.dataclass
class ChunkedMetadata:
    """Tokens of several sequences that each continue that sequence's cached context.

    Used by chunked prefill (Sarathi) batches that mix decode tokens and prompt chunks: token t
    belongs to sequence token_seq[t] at position positions[t] and sees that sequence's cached
    tokens 0..positions[t] (its own K/V is written before attention).
    """
    positions: jax.Array      # [T] int32
    token_seq: jax.Array      # [T] int32, row of block_tables; -1 for padding
    slot_mapping: jax.Array   # [T] int32
    block_tables: jax.Array   # [B, W] int32
    last_token_idx: jax.Array  # [B] int32


class AttentionBackend(Protocol):
    """What the model needs from an attention implementation. Implementations are hashable
    (they are static arguments of jitted functions)."""

    def write_kv(self, k_cache, v_cache, layer, k, v, slot_mapping):
        """Store k, v ([N, Hkv, D]) at slot_mapping ([N]) of `layer`; returns the new caches."""

    def prefill(self, q, k, v, meta: PrefillMetadata, window: int | None = None) -> jax.Array:
        """Causal attention inside each packed prompt. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""

    def decode(self, q, k_cache, v_cache, layer, meta: DecodeMetadata,
               window: int | None = None) -> jax.Array:
        """q [B, H, D] against each sequence's cached tokens -> [B, H, D]."""

    def chunked(self, q, k_cache, v_cache, layer, meta: ChunkedMetadata,
                window: int | None = None) -> jax.Array:
        """q [T, H, D], each token against its sequence's cache up to its position -> [T, H, D]."""


def write_kv_scatter(k_cache, v_cache, layer, k, v, slot_mapping):
    """Scatter new K/V into their pages; out-of-range slots are dropped (padding)."""
    num_pages, page_size = k_cache.shape[1], k_cache.shape[2]
    page = slot_mapping // page_size
    offset = slot_mapping % page_size
    page = jnp.where(slot_mapping < 0, num_pages, page)  # negative slots must not wrap around
    k_cache = k_cache.at[layer, page, offset].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, page, offset].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


# Block sizes, tuned on CPU (docs/kernels.md). XLA runs a loop iteration's ops one at a time,
# each with some microseconds of fixed cost, and a large temporary costs page faults on every
# call (about 1 ms per MiB on a VM). So the loops move a few MiB per iteration: enough work to
# amortise the per-op cost, small enough to stay in cache.
# Prefill and multi-token chunked rows: tokens per query tile and per key block.
BLOCK_TOKENS = 128
# Smaller query tiles for chunked rows that fit them.
SHORT_RUN_TILES = (32, 64)
# Decode rows: bytes of K gathered per loop step (V is as much again), summed over a group of
# rows that walk their pages together. A step's K and V then stay within a core's L2 cache
# (2 MiB here): at 1,024 tokens a step (3 MiB of K at opt-125m's 12 x 64 heads), decode
# attention ran at 3-8 GB/s against 31 GB/s of read bandwidth, and at 128 tokens 1.2-2.6x
# faster at batch 2-64 (docs/kernels.md). opt-125m: 128 tokens, groups of 8 rows of one page.
DECODE_STEP_BYTES = 384 << 10
# ...and at most this many pages of one row: tables are padded to the request maximum, and a
# short row at batch 1 would otherwise gather and mask 1024 tokens a step (1.2x the step time
# of opt-tiny at 32 tokens; benchmarks/bench_table_width.py).
DECODE_ROW_PAGES = 16
# ...and of one row at most this many bytes of K (whole pages, at least one). Several pages of
# a row in one step gather into a [pages x page tokens] run that the score product transposes
# whole. One opt-125m page (48 KiB) a row a step was quicker than 2-8 at every batch below 8
# and the same from 8 up (where a step already held one page a row); bench_model.py at
# c064c0e against bbc3634, which differ by this line alone, shows it.
DECODE_ROW_STEP_BYTES = 48 << 10


def _in_window(q_pos, k_pos, window):
    """Keys a query may see besides causality: within the sliding window, if any."""
    return True if window is None else q_pos - k_pos < window


def _scores(q, k):
    """Grouped-query scores: q [Q, H, D], k [K, Hkv, D] -> [H, Q, K] float32 (query head h
    reads KV head h // groups, without copying K per group)."""
    n, h, d = q.shape
    hkv = k.shape[1]
    s = jnp.einsum("qkgd,nkd->kgqn", q.reshape(n, hkv, h // hkv, d), k,
                   preferred_element_type=jnp.float32)
    return s.reshape(h, n, k.shape[0])


def _weighted_values(p, v):
    """p [H, Q, K] float32, v [K, Hkv, D] -> [H, Q, D]."""
    h, n, m = p.shape
    hkv = v.shape[1]
    out = jnp.einsum("kgqn,nkd->kgqd", p.reshape(hkv, h // hkv, n, m), v)
    return out.reshape(h, n, v.shape[-1])


def _full_like(x, value, shape):
    """float32 array of `shape` that varies over the same shard_map axes as x, as loop carries
    that mix with x must (check_vma)."""
    return jax.lax.full_like(x, value, jnp.float32, shape)


def _softmax_init(x, shape, head_dim):
    """Online-softmax state for queries laid out as `shape`: running max, running sum, and a
    float32 accumulator of shape + (head_dim,)."""
    return (_full_like(x, MASK_VALUE, shape), _full_like(x, 0, shape),
            _full_like(x, 0, (*shape, head_dim)))


def _softmax_step(m, l, scores, mask):
    """Online softmax over one key block (last axis): running max m and sum l -> new m, new l,
    the block's unnormalised probabilities p and the rescale factor for what came before."""
    scores = jnp.where(mask, scores, MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(-1))
    p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * l + p.sum(-1), p, alpha


def _finish(l, acc):
    """Normalise; a query that saw no key gives zeros."""
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def _tile_init(q):
    """State of a query tile q [Q, H, D]: statistics [H, Q], accumulator [H, Q, D]."""
    n, h, d = q.shape
    return _softmax_init(q, (h, n), d)


def _tile_step(state, q, k, v, mask):
    """Fold a key block shared by the tile's queries: q [Q, H, D], k/v [K, Hkv, D], mask [Q, K]."""
    m, l, acc = state
    d = q.shape[-1]
    scores = _scores(q, k) * d ** -0.5
    m, l, p, alpha = _softmax_step(m, l, scores, mask)
    # Keys no query sees may be NaN garbage (unused page slots) and 0 * NaN = NaN: zero them.
    v = jnp.where(mask.any(0)[:, None, None], v.astype(jnp.float32), 0.0)
    return m, l, alpha[..., None] * acc + _weighted_values(p, v)


def _tile_finish(state):
    """-> [Q, H, D] float32."""
    _, l, acc = state
    return _finish(l, acc).transpose(1, 0, 2)


def _padded_tables(k_cache, block_tables, pages_per_block):
    """Block tables padded to whole blocks, junk entries clipped to real pages (masked later).

    One more block than needed: were a block the whole table, the loops' page slices would not
    depend on the step, XLA would hoist the gather out of the loop and fuse the layer scan's
    K/V write into it, and then copy the whole cache every layer to keep the write in place
    (seen at decode batch 1: 40x slower)."""
    pages = jnp.clip(block_tables, 0, k_cache.shape[1] - 1)
    return jnp.pad(pages, ((0, 0), (0, -block_tables.shape[1] % pages_per_block + pages_per_block)))


# Pages are read as cache[layer, page_ids]: one gather of just those pages. Not cache[layer]
# (which copies the whole layer slab every step: that was most of the old decode time) and not a
# reshape of the cache to [L * P, ...] (with the layer scan's in-place K/V writes, XLA then
# copies the whole cache every layer).


def _decode_step_tokens(k_cache) -> int:
    """Tokens of K/V a decode loop step gathers, over all rows of its group (whole pages)."""
    page_size, hkv, d = k_cache.shape[2:]
    per_token = hkv * d * k_cache.dtype.itemsize
    return max(page_size, DECODE_STEP_BYTES // per_token // page_size * page_size)


def _attend_rows(q, q_pos, block_tables, k_cache, v_cache, layer, window=None):
    """One query per row against that row's cached tokens 0..q_pos (-1: none), vectorised
    over rows: q [B, H, D], block_tables [B, W] -> [B, H, D] float32.

    Rows go in groups of up to one page-step's worth (`_decode_step_tokens`); each group walks
    its rows' pages a step at a time, up to its own longest row. Padding rows (-1) added to fill
    the last group cost nothing where a whole group is padding."""
    b = q.shape[0]
    group = max(1, min(b, _decode_step_tokens(k_cache) // k_cache.shape[2]))
    if group == b:
        return _attend_row_group(q, q_pos, block_tables, k_cache, v_cache, layer, window)
    groups = -(-b // group)
    pad = groups * group - b
    q_p = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    pos_p = jnp.pad(q_pos, (0, pad), constant_values=-1)
    tables_p = jnp.pad(block_tables, ((0, pad), (0, 0)))

    def one_group(i, out):
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, i * group, group, 0)  # noqa: E731
        o = _attend_row_group(rows(q_p), rows(pos_p), rows(tables_p), k_cache, v_cache, layer,
                              window)
        return jax.lax.dynamic_update_slice_in_dim(out, o, i * group, 0)

    # Groups past the last live row are skipped outright (they would give zeros): a prefill's
    # prompt slots are mostly padding.
    live = jnp.max(jnp.where(q_pos >= 0, jnp.arange(b) + 1, 0))
    out = jax.lax.fori_loop(0, (live + group - 1) // group, one_group,
                            _full_like(q, 0, q_p.shape))
    return out[:b]


def _attend_row_group(q, q_pos, block_tables, k_cache, v_cache, layer, window=None):
    """`_attend_rows` for one group: each step gathers the next few pages of every row
    ([B, pages, S, Hkv, D]) and folds them into a per-row online softmax; steps run up to the
    longest row."""
    b, h, d = q.shape
    page_size, hkv = k_cache.shape[2:4]
    page_bytes = page_size * hkv * d * k_cache.dtype.itemsize
    per_step = max(1, min(_decode_step_tokens(k_cache) // (b * page_size), DECODE_ROW_PAGES,
                          DECODE_ROW_STEP_BYTES // page_bytes, block_tables.shape[1]))
    pages = _padded_tables(k_cache, block_tables, per_step)
    n = per_step * page_size
    num_steps = jnp.minimum((q_pos.max() + n) // n, pages.shape[1] // per_step)

    groups = h // hkv
    grouped_q = q.reshape(b, hkv, groups, d)

    def step(j, state):
        m, l, acc = state
        ids = jax.lax.dynamic_slice_in_dim(pages, j * per_step, per_step, 1)
        k = k_cache[layer, ids].reshape(b, n, hkv, d)
        v = v_cache[layer, ids].reshape(b, n, hkv, d)
        k_pos = (j * n + jnp.arange(n))[None, :]
        visible = (k_pos <= q_pos[:, None]) & _in_window(q_pos[:, None], k_pos, window)
        scores = jnp.einsum("bkgd,bnkd->bkgn", grouped_q, k,
                            preferred_element_type=jnp.float32).reshape(b, h, n) * d ** -0.5
        m, l, p, alpha = _softmax_step(m, l, scores, visible[:, None, :])
        v = jnp.where(visible[..., None, None], v.astype(jnp.float32), 0.0)  # NaN garbage
        pv = jnp.einsum("bkgn,bnkd->bkgd", p.reshape(b, hkv, groups, n), v).reshape(b, h, d)
        return m, l, alpha[..., None] * acc + pv

    _, l, acc = jax.lax.fori_loop(0, num_steps, step, _softmax_init(q, (b, h), d))
    return _finish(l, acc)


def _attend_run(q, q_pos, pages, k_cache, v_cache, layer, pages_per_block, window=None):
    """Queries of one sequence against its cached tokens 0..q_pos (each query its own bound).

    q [Q, H, D], q_pos [Q] (-1: no query), pages [N] page ids of the sequence (padded to whole
    blocks). Walks blocks of pages_per_block pages up to the largest position, reading each page
    once for the whole tile -> [Q, H, D] float32."""
    page_size, hkv, d = k_cache.shape[2:]
    n = pages_per_block * page_size
    num_blocks = jnp.minimum((q_pos.max() + n) // n, pages.shape[0] // pages_per_block)

    def block(j, state):
        ids = jax.lax.dynamic_slice_in_dim(pages, j * pages_per_block, pages_per_block)
        k = k_cache[layer, ids].reshape(n, hkv, d)
        v = v_cache[layer, ids].reshape(n, hkv, d)
        k_pos = (j * n + jnp.arange(n))[None, :]
        visible = (k_pos <= q_pos[:, None]) & _in_window(q_pos[:, None], k_pos, window)
        return _tile_step(state, q, k, v, visible)

    return _tile_finish(jax.lax.fori_loop(0, num_blocks, block, _tile_init(q)))


@struct.dataclass
class XLAAttention:
    """Reference attention in plain jnp, float32 softmax. Runs anywhere; tuned for CPU.

    Every path is a flash-style loop (online softmax over key blocks) that reads only the keys
    a query can see: prefill visits, per query tile, the key blocks from the start of its first
    prompt to the tile itself; decode and chunked read each sequence's pages through the block
    table straight from the cache, a few pages at a time. Nothing of size tokens x tokens or
    tokens x context is ever materialised."""
    # Decode and chunked loops stop at the longest live row: unused block-table columns cost
    # no compute (the runner then pads every table to one width).
    work_tracks_context = True

    def write_kv(self, k_cache, v_cache, layer, k, v, slot_mapping):
        return write_kv_scatter(k_cache, v_cache, layer, k, v, slot_mapping)

    def prefill(self, q, k, v, meta: PrefillMetadata, window: int | None = None):
        t, h, d = q.shape
        tile = min(BLOCK_TOKENS, t)
        pad = -t % tile
        num_tiles = (t + pad) // tile
        tiled = lambda x, fill=0: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1),  # noqa: E731
                                          constant_values=fill).reshape(num_tiles, tile,
                                                                        *x.shape[1:])
        q_t, k_t, v_t = tiled(q), tiled(k), tiled(v)
        seq, pos = tiled(meta.seq_ids, -1), tiled(meta.positions)
        # Padding only trails the real tokens, so a tile's keys run from the start of the
        # prompt of its first token to the tile itself; a tile of pure padding visits nothing.
        live = seq[:, 0] >= 0
        first_block = jnp.where(live, meta.cu_seqlens[jnp.maximum(seq[:, 0], 0)] // tile, 0)
        end_block = jnp.where(live, jnp.arange(num_tiles) + 1, 0)

        def query_tile(i, out):
            def block(j, state):
                mask = ((seq[i][:, None] == seq[j][None, :]) & (seq[i][:, None] >= 0)
                        & (pos[i][:, None] >= pos[j][None, :])
                        & _in_window(pos[i][:, None], pos[j][None, :], window))
                return _tile_step(state, q_t[i], k_t[j], v_t[j], mask)
            state = jax.lax.fori_loop(first_block[i], end_block[i], block, _tile_init(q_t[i]))
            return out.at[i].set(_tile_finish(state))

        out = jax.lax.fori_loop(0, num_tiles, query_tile,
                                _full_like(q, 0, (num_tiles, tile, h, d)))
        return out.reshape(-1, h, d)[:t].astype(q.dtype)

    def decode(self, q, k_cache, v_cache, layer, meta: DecodeMetadata, window=None):
        return _attend_rows(q, meta.context_lens - 1, meta.block_tables, k_cache, v_cache,
                            layer, window).astype(q.dtype)

    def chunked(self, q, k_cache, v_cache, layer, meta: ChunkedMetadata, window=None):
        t, h, d = q.shape
        rows, width = meta.block_tables.shape
        # Sort tokens by sequence (stable; padding last) so each sequence's tokens are one run;
        # the runner already packs them so, but the metadata allows any order.
        seq = jnp.where(meta.token_seq >= 0, meta.token_seq, rows)
        order = jnp.argsort(seq, stable=True)
        counts = jnp.zeros(rows + 1, jnp.int32).at[seq].add(1)[:rows]
        starts = jnp.cumsum(counts) - counts
        q_pos = jnp.where(meta.token_seq >= 0, meta.positions, -1)
        row_end = jnp.zeros(rows + 1, jnp.int32).at[seq].max(q_pos + 1)[:rows]   # context

        # Rows of one token (the decode rows of a mixed batch) go together, one query per row.
        single = counts == 1
        token = order[jnp.minimum(starts, t - 1)]

        def with_single_rows(out):
            single_out = _attend_rows(q[token], jnp.where(single, q_pos[token], -1),
                                      meta.block_tables, k_cache, v_cache, layer, window)
            return out.at[jnp.where(single, token, t)].set(single_out, mode="drop")

        # Longer rows (prompt chunks) in tiles of up to BLOCK_TOKENS of their tokens, each tile
        # reading the row's pages once. Runs are padded by a tile so a slice never gets clamped
        # back over other tokens.
        tile = min(BLOCK_TOKENS, t)
        pb = max(1, min(BLOCK_TOKENS // k_cache.shape[2], width))
        pages = _padded_tables(k_cache, meta.block_tables, pb)
        q_s = jnp.pad(q[order], ((0, tile), (0, 0), (0, 0)))
        pos_s = jnp.pad(q_pos[order], (0, tile), constant_values=-1)

        def row(r, out):
            def tiles_of(size):   # the row's tokens in tiles of `size` queries
                def one_tile(i, out):
                    at = starts[r] + i * size
                    mine = i * size + jnp.arange(size) < counts[r]
                    tile_pos = jnp.where(mine, jax.lax.dynamic_slice_in_dim(pos_s, at, size),
                                         -1)
                    # keys in blocks no longer than the tile (a short row reads few pages)
                    o = _attend_run(jax.lax.dynamic_slice_in_dim(q_s, at, size, 0), tile_pos,
                                    pages[r], k_cache, v_cache, layer,
                                    max(1, min(pb, size // k_cache.shape[2])), window)
                    prev = jax.lax.dynamic_slice_in_dim(out, at, size, 0)
                    return jax.lax.dynamic_update_slice_in_dim(
                        out, jnp.where(mine[:, None, None], o, prev), at, 0)
                num_tiles = jnp.where(single[r], 0, (counts[r] + size - 1) // size)
                return lambda: jax.lax.fori_loop(0, num_tiles, one_tile, out)
            # The smallest tile that holds the row, where its context fits one full key block
            # (a short prompt in a tile of BLOCK_TOKENS queries wasted most of its work),
            # else the largest: a short chunk late in a long context reads its pages in
            # blocks of BLOCK_TOKENS keys.
            sizes = [s for s in SHORT_RUN_TILES if s < tile] + [tile]
            which = jnp.where(row_end[r] <= pb * k_cache.shape[2],
                              jnp.sum(jnp.array(sizes[:-1]) < counts[r]), len(sizes) - 1)
            return jax.lax.switch(which, [tiles_of(s) for s in sizes])

        # Up to the last row with tokens: the rest are padding (a prefill's unused prompt slots).
        live_rows = jnp.max(jnp.where(counts > 0, jnp.arange(rows) + 1, 0))
        out_s = jax.lax.fori_loop(0, live_rows, row, _full_like(q, 0, (t + tile, h, d)))
        out = _full_like(q, 0, q.shape).at[order].set(out_s[:t])
        # (a step of prompts mostly has none: their gather and scatter over every row skipped)
        out = jax.lax.cond(jnp.any(single), with_single_rows, lambda out: out, out)
        return out.astype(q.dtype)
