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


def masked_softmax(scores, mask):
    """Softmax over the last axis where mask holds; rows with nothing visible give zeros."""
    scores = jnp.where(mask, scores, MASK_VALUE)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def write_kv_scatter(k_cache, v_cache, layer, k, v, slot_mapping):
    """Scatter new K/V into their pages; out-of-range slots are dropped (padding)."""
    num_pages, page_size = k_cache.shape[1], k_cache.shape[2]
    page = slot_mapping // page_size
    offset = slot_mapping % page_size
    page = jnp.where(slot_mapping < 0, num_pages, page)  # negative slots must not wrap around
    k_cache = k_cache.at[layer, page, offset].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, page, offset].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def _gather_pages(cache, layer, block_tables):
    """[L, P, S, H, D] -> [B, W*S, H, D]: each sequence's pages in order."""
    pages = cache[layer][block_tables]  # [B, W, S, H, D]
    b, w, s, h, d = pages.shape
    return pages.reshape(b, w * s, h, d)


def _repeat_kv(x, num_q_heads):
    """Grouped-query support: repeat KV heads to match query heads (identity for OPT)."""
    rep = num_q_heads // x.shape[-2]
    return x if rep == 1 else jnp.repeat(x, rep, axis=-2)


@struct.dataclass
class XLAAttention:
    """Reference attention in plain jnp: dense masks, float32 softmax. Runs anywhere."""

    def write_kv(self, k_cache, v_cache, layer, k, v, slot_mapping):
        return write_kv_scatter(k_cache, v_cache, layer, k, v, slot_mapping)

    def prefill(self, q, k, v, meta: PrefillMetadata):
        t, h, d = q.shape
        k, v = _repeat_kv(k, h), _repeat_kv(v, h)
        scores = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * d ** -0.5
        same_seq = (meta.seq_ids[:, None] == meta.seq_ids[None, :]) & (meta.seq_ids[:, None] >= 0)
        causal = meta.positions[:, None] >= meta.positions[None, :]
        mask = (same_seq & causal)[None]
        weights = masked_softmax(scores, mask)
        out = jnp.einsum("hqk,khd->qhd", weights, v.astype(jnp.float32))
        return out.astype(q.dtype)

    def decode(self, q, k_cache, v_cache, layer, meta: DecodeMetadata):
        b, h, d = q.shape
        k = _repeat_kv(_gather_pages(k_cache, layer, meta.block_tables), h)  # [B, L, H, D]
        v = _repeat_kv(_gather_pages(v_cache, layer, meta.block_tables), h)
        scores = jnp.einsum("bhd,blhd->bhl", q, k, preferred_element_type=jnp.float32) * d ** -0.5
        mask = (jnp.arange(k.shape[1])[None, :] < meta.context_lens[:, None])[:, None, :]
        weights = masked_softmax(scores, mask)
        out = jnp.einsum("bhl,blhd->bhd", weights, v.astype(jnp.float32))
        return out.astype(q.dtype)

    def chunked(self, q, k_cache, v_cache, layer, meta: ChunkedMetadata):
        t, h, d = q.shape
        seq = jnp.maximum(meta.token_seq, 0)
        # Each token reads its own sequence's pages: [T, W*S, H, D]. Fine for the modest
        # token budgets of chunked steps; a kernel would stream pages instead.
        k = _repeat_kv(_gather_pages(k_cache, layer, meta.block_tables[seq]), h)
        v = _repeat_kv(_gather_pages(v_cache, layer, meta.block_tables[seq]), h)
        scores = jnp.einsum("thd,tlhd->thl", q, k, preferred_element_type=jnp.float32) * d ** -0.5
        visible = jnp.arange(k.shape[1])[None, :] <= meta.positions[:, None]
        mask = (visible & (meta.token_seq >= 0)[:, None])[:, None, :]
        weights = masked_softmax(scores, mask)
        out = jnp.einsum("thl,tlhd->thd", weights, v.astype(jnp.float32))
        return out.astype(q.dtype)
