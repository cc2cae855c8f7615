"""The attention interface the model calls, its metadata, and the XLA reference implementation.

The KV cache of one model instance is two arrays, K and V, each
    [num_layers, num_pages, page_size, num_kv_heads, head_dim]
Layers first so a layer scan indexes one contiguous slab; heads before head_dim so tensor
parallelism shards axis 3 and each device keeps whole pages of its own heads; a page is
page_size consecutive tokens of one sequence. Slot s of a layer is token (s % page_size) of
page (s // page_size). A slot >= num_pages * page_size means "write nowhere" (padding).

Backends (this XLA one, the Pallas kernels in dsjax.executor.kernels) implement `AttentionBackend`.
They receive the whole cache plus the layer index so a kernel can read the layer in place
instead of the model slicing (copying) it every step.
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

    def prefill(self, q, k, v, meta: PrefillMetadata) -> jax.Array:
        """Causal attention inside each packed prompt. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""

    def decode(self, q, k_cache, v_cache, layer, meta: DecodeMetadata) -> jax.Array:
        """q [B, H, D] against each sequence's cached tokens -> [B, H, D]."""

    def chunked(self, q, k_cache, v_cache, layer, meta: ChunkedMetadata) -> jax.Array:
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


# Tokens per query tile and per key block. XLA on CPU runs a loop iteration's ops on one core,
# so blocks are sized to stay in cache (128 keys x 12 heads x 64 is 384 KiB) while each
# iteration still does enough work to hide the loop overhead.
BLOCK_TOKENS = 128
# Rows of a chunked step with fewer tokens than this attend token by token: a [1, keys] pass
# per token reads the pages again, which costs less than the padded rows of a full tile's matmul.
MIN_TILED_ROW = 16


def _repeat_kv(x, num_q_heads):
    """Grouped-query support: repeat KV heads to match query heads (identity for OPT)."""
    rep = num_q_heads // x.shape[-2]
    return x if rep == 1 else jnp.repeat(x, rep, axis=-2)


def _scores(q, k):
    """q [Q, H, D], k [K, Hkv, D] -> scaled float32 scores [H, Q, K]."""
    k = _repeat_kv(k, q.shape[1])
    return jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5


def _full_like(x, value, shape):
    """float32 array of `shape` that varies over the same shard_map axes as x, as loop carries
    that mix with x must (check_vma)."""
    return jax.lax.full_like(x, value, jnp.float32, shape)


def _flash_init(q):
    """Online-softmax state for q [Q, H, D]: running max, running sum, float32 accumulator."""
    n, h, d = q.shape
    return (_full_like(q, MASK_VALUE, (h, n)), _full_like(q, 0, (h, n)), _full_like(q, 0, (h, n, d)))


def _flash_step(state, scores, v, mask):
    """Fold one key block into the state: scores [H, Q, K], v [K, Hkv, D], mask [Q, K]."""
    m, l, acc = state
    scores = jnp.where(mask, scores, MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(-1))
    p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    # Keys no query sees may be NaN garbage (unused page slots) and 0 * NaN = NaN: zero them.
    v = jnp.where(mask.any(0)[:, None, None], v.astype(jnp.float32), 0.0)
    pv = jnp.einsum("hqk,khd->hqd", p, _repeat_kv(v, p.shape[0]))
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv


def _flash_finish(state):
    """[Q, H, D] float32; a query that saw no key gives zeros."""
    _, l, acc = state
    return (acc / jnp.where(l > 0, l, 1.0)[..., None]).transpose(1, 0, 2)


def _paged_pages(k_cache, layer, block_tables, pages_per_block):
    """Flat page ids of `layer` ([B, W] -> [B, W rounded up to pages_per_block]).

    The cache [L, P, S, Hkv, D] is read as [L * P, S, Hkv, D] (a free reshape) at
    layer * P + page, so the scan's traced layer never makes XLA slice (copy) a layer slab.
    Junk entries are clipped into the layer, and masked later."""
    num_pages = k_cache.shape[1]
    width = block_tables.shape[1]
    pad = -width % pages_per_block
    pages = layer * num_pages + jnp.clip(block_tables, 0, num_pages - 1)
    return jnp.pad(pages, ((0, 0), (0, pad)))


def _attend_paged(q, q_pos, pages, k_flat, v_flat, pages_per_block):
    """Queries of one sequence against its cached tokens 0..q_pos (each query its own bound).

    q [Q, H, D], q_pos [Q] (-1: no query), pages [N] flat page ids of the sequence.
    Walks key blocks of pages_per_block pages up to the largest position, reading each page
    once for the whole tile -> [Q, H, D] float32."""
    page_size, hkv, d = k_flat.shape[1:]
    n = pages_per_block * page_size
    num_blocks = jnp.minimum((q_pos.max() + n) // n, pages.shape[0] // pages_per_block)

    def block(j, state):
        ids = jax.lax.dynamic_slice_in_dim(pages, j * pages_per_block, pages_per_block)
        k = k_flat[ids].reshape(n, hkv, d)
        v = v_flat[ids].reshape(n, hkv, d)
        mask = (j * n + jnp.arange(n))[None, :] <= q_pos[:, None]
        return _flash_step(state, _scores(q, k), v, mask)

    return _flash_finish(jax.lax.fori_loop(0, num_blocks, block, _flash_init(q)))


def _pages_per_block(page_size, width):
    return max(1, min(BLOCK_TOKENS // page_size, width))


def _flat_cache(cache):
    num_layers, num_pages = cache.shape[:2]
    return cache.reshape(num_layers * num_pages, *cache.shape[2:])


@struct.dataclass
class XLAAttention:
    """Reference attention in plain jnp, float32 softmax. Runs anywhere.

    Every path is a flash-style loop (online softmax over key blocks) that reads only the keys
    a query can see: prefill visits, per query tile, the key blocks from the start of its first
    prompt to its own end; decode and chunked read each sequence's pages through the block
    table, one block of pages at a time, straight from the cache. Nothing of size
    tokens x tokens or tokens x context is ever materialised."""

    def write_kv(self, k_cache, v_cache, layer, k, v, slot_mapping):
        return write_kv_scatter(k_cache, v_cache, layer, k, v, slot_mapping)

    def prefill(self, q, k, v, meta: PrefillMetadata):
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
                        & (pos[i][:, None] >= pos[j][None, :]))
                return _flash_step(state, _scores(q_t[i], k_t[j]), v_t[j], mask)
            state = jax.lax.fori_loop(first_block[i], end_block[i], block, _flash_init(q_t[i]))
            return out.at[i].set(_flash_finish(state))

        out = jax.lax.fori_loop(0, num_tiles, query_tile,
                                _full_like(q, 0, (num_tiles, tile, h, d)))
        return out.reshape(-1, h, d)[:t].astype(q.dtype)

    def decode(self, q, k_cache, v_cache, layer, meta: DecodeMetadata):
        b, h, d = q.shape
        pb = _pages_per_block(k_cache.shape[2], meta.block_tables.shape[1])
        pages = _paged_pages(k_cache, layer, meta.block_tables, pb)
        k_flat, v_flat = _flat_cache(k_cache), _flat_cache(v_cache)

        # One sequence at a time: its blocks up to its own length, padding rows read nothing.
        def row(i, out):
            o = _attend_paged(q[i][None], meta.context_lens[i][None] - 1, pages[i], k_flat,
                              v_flat, pb)
            return out.at[i].set(o[0])

        return jax.lax.fori_loop(0, b, row, _full_like(q, 0, q.shape)).astype(q.dtype)

    def chunked(self, q, k_cache, v_cache, layer, meta: ChunkedMetadata):
        t, h, d = q.shape
        rows = meta.block_tables.shape[0]
        pb = _pages_per_block(k_cache.shape[2], meta.block_tables.shape[1])
        pages = _paged_pages(k_cache, layer, meta.block_tables, pb)
        k_flat, v_flat = _flat_cache(k_cache), _flat_cache(v_cache)
        # Sort tokens by sequence (stable; padding last) so each sequence's tokens are one run
        # that tiles can slice; the runner already packs them so, but the metadata allows any
        # order. Runs are padded by a tile so a slice never gets clamped back over real tokens.
        seq = jnp.where(meta.token_seq >= 0, meta.token_seq, rows)
        order = jnp.argsort(seq, stable=True)
        counts = jnp.zeros(rows + 1, jnp.int32).at[seq].add(1)[:rows]
        starts = jnp.cumsum(counts) - counts
        tile = min(BLOCK_TOKENS, t)
        q_s = jnp.pad(q[order], ((0, tile), (0, 0), (0, 0)))
        pos_s = jnp.pad(jnp.where(meta.token_seq >= 0, meta.positions, -1)[order], (0, tile),
                        constant_values=-1)

        def row(r, out):
            def tiles(size):
                def one(i, out):
                    at = starts[r] + i * size
                    mine = i * size + jnp.arange(size) < counts[r]
                    q_pos = jnp.where(mine, jax.lax.dynamic_slice_in_dim(pos_s, at, size), -1)
                    o = _attend_paged(jax.lax.dynamic_slice_in_dim(q_s, at, size, 0), q_pos,
                                      pages[r], k_flat, v_flat, pb)
                    prev = jax.lax.dynamic_slice_in_dim(out, at, size, 0)
                    return jax.lax.dynamic_update_slice_in_dim(
                        out, jnp.where(mine[:, None, None], o, prev), at, 0)
                return lambda out: jax.lax.fori_loop(0, (counts[r] + size - 1) // size, one, out)
            return jax.lax.cond(counts[r] >= MIN_TILED_ROW, tiles(tile), tiles(1), out)

        out_s = jax.lax.fori_loop(0, rows, row, _full_like(q, 0, (t + tile, h, d)))
        out = _full_like(q, 0, q.shape).at[order].set(out_s[:t])
        return out.astype(q.dtype)
