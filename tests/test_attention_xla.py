"""XLAAttention against a float64 NumPy reference written here from the metadata's definitions.

Random inputs with mixed lengths, padding, shuffled pages, junk block-table entries and NaN in
every cache slot that holds no live token (other layers included), page sizes 4 and 16, head
dims 64 and 80. Lengths cross the implementation's tile and block size so several tiles and
blocks (and their edges) are exercised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.models import attention
from dsjax.models.attention import (BLOCK_TOKENS, ChunkedMetadata, DecodeMetadata, PrefillMetadata,
                              XLAAttention)

TOLERANCE = 5e-6  # max |out - ref| / max |ref|, float32 against float64
HEADS, LAYERS, LAYER = 4, 3, 1


def attend(q, k, v):
    """q [H, D], k/v [L, Hkv, D] float64 -> [H, D]; softmax over all L keys."""
    rep = q.shape[0] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("hd,lhd->hl", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hl,lhd->hd", w / w.sum(-1, keepdims=True), v)


def assert_close(out, ref, what):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), f"non-finite values in {what}"
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= TOLERANCE, f"relative error {err:.3g} in {what}"


def normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


class PagedCase:
    """A cache of NaN with live tokens only where the sequences' pages say."""

    def __init__(self, rng, lens, page_size, head_dim, kv_heads, width):
        self.page_size = page_size
        pages_needed = [-(-n // page_size) for n in lens]
        num_pages = sum(pages_needed) + 3
        perm = rng.permutation(num_pages)
        # Junk past each sequence's pages: other sequences' pages, -1 and out-of-range ids.
        tables = rng.choice([-1, 0, num_pages, 10 * num_pages], (len(lens), width))
        at = 0
        for b, n in enumerate(pages_needed):
            tables[b, :n] = perm[at:at + n]
            at += n
        self.tables = tables.astype(np.int32)
        shape = (LAYERS, num_pages, page_size, kv_heads, head_dim)
        self.k, self.v = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
        self.seq_k = [normal(rng, n, kv_heads, head_dim) for n in lens]
        self.seq_v = [normal(rng, n, kv_heads, head_dim) for n in lens]
        for b, n in enumerate(lens):
            t = np.arange(n)
            page, off = self.tables[b, t // page_size], t % page_size
            self.k[LAYER, page, off] = self.seq_k[b]
            self.v[LAYER, page, off] = self.seq_v[b]

    def reference(self, q, seq, pos):
        """Token t (seq[t], -1 = padding) attends to its sequence's tokens 0..pos[t]."""
        out = np.zeros(q.shape)
        for t, (b, p) in enumerate(zip(seq, pos)):
            if b >= 0:
                out[t] = attend(q[t].astype(np.float64), self.seq_k[b][:p + 1].astype(np.float64),
                                self.seq_v[b][:p + 1].astype(np.float64))
        return out


def run(method, *args):
    """Jitted with the layer traced, as in the model's layer scan."""
    return np.asarray(jax.jit(method)(*args))


@pytest.mark.parametrize("head_dim,kv_heads", [(64, HEADS), (80, 2)])
def test_prefill(head_dim, kv_heads):
    rng = np.random.default_rng(head_dim)
    lens = [3, BLOCK_TOKENS + 40, 1, 60, BLOCK_TOKENS - 1]  # prompts straddle tiles
    total = sum(lens)
    t = total + 37  # padding, and not a multiple of the tile
    q, k, v = normal(rng, t, HEADS, head_dim), normal(rng, t, kv_heads, head_dim), \
        normal(rng, t, kv_heads, head_dim)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    seq = np.full(t, -1, np.int32)
    pos = np.zeros(t, np.int32)
    for i, n in enumerate(lens):
        seq[cu[i]:cu[i + 1]], pos[cu[i]:cu[i + 1]] = i, np.arange(n)
    meta = PrefillMetadata(positions=jnp.asarray(pos), seq_ids=jnp.asarray(seq),
                           cu_seqlens=jnp.asarray(cu), slot_mapping=jnp.zeros(t, jnp.int32),
                           last_token_idx=jnp.asarray(cu[1:] - 1))
    out = run(XLAAttention().prefill, q, k, v, meta)
    ref = np.zeros(q.shape)
    for i in range(len(lens)):
        for j in range(cu[i], cu[i + 1]):
            ref[j] = attend(q[j].astype(np.float64), k[cu[i]:j + 1].astype(np.float64),
                            v[cu[i]:j + 1].astype(np.float64))
    assert_close(out, ref, f"prefill D={head_dim}")


def check_decode(seed, lens, page_size, head_dim, kv_heads, what):
    """XLAAttention.decode of one query per row (context lens `lens`, 0: padding) against the
    float64 reference."""
    rng = np.random.default_rng(seed)
    width = -(-max(lens) // page_size) + 2
    case = PagedCase(rng, lens, page_size, head_dim, kv_heads, width)
    q = normal(rng, len(lens), HEADS, head_dim)
    ctx = np.array(lens, np.int32)
    meta = DecodeMetadata(positions=jnp.asarray(np.maximum(ctx - 1, 0)),
                          slot_mapping=jnp.zeros(len(lens), jnp.int32),
                          block_tables=jnp.asarray(case.tables), context_lens=jnp.asarray(ctx))
    out = run(XLAAttention().decode, q, case.k, case.v, jnp.int32(LAYER), meta)
    seq = np.where(ctx > 0, np.arange(len(lens)), -1)
    assert_close(out, case.reference(q, seq, ctx - 1), f"{what} page_size={page_size}")


@pytest.mark.parametrize("page_size,head_dim,kv_heads", [(4, 64, HEADS), (16, 80, 2)])
def test_decode(page_size, head_dim, kv_heads):
    check_decode(page_size, [1, 2 * BLOCK_TOKENS + 5, 37, 0, BLOCK_TOKENS, 0],  # 0: padding
                 page_size, head_dim, kv_heads, "decode")


@pytest.mark.parametrize("page_size,head_dim,kv_heads", [(4, 64, HEADS), (16, 80, 2)])
def test_decode_in_row_groups(monkeypatch, page_size, head_dim, kv_heads):
    """Rows walk their pages in groups when a step's K would outgrow DECODE_STEP_BYTES: here
    groups of 2 rows, one of them all padding and the last one filled by a padding row."""
    monkeypatch.setattr(attention, "DECODE_STEP_BYTES", 2 * page_size * kv_heads * head_dim * 4)
    check_decode(page_size + 1, [0, 0, 1, 2 * BLOCK_TOKENS + 5, 37, BLOCK_TOKENS, 9],
                 page_size, head_dim, kv_heads, "grouped decode")


@pytest.mark.parametrize("page_size,head_dim,kv_heads", [(4, 80, HEADS), (16, 64, 1)])
def test_chunked(page_size, head_dim, kv_heads):
    """Decode rows, short chunks (token by token), a long chunk over several tiles and key
    blocks, chunks at and past each smaller tile's size, empty rows (one after the last live
    row) and padding tokens, in shuffled token order."""
    rng = np.random.default_rng(page_size + 1)
    # (cached tokens before this step, tokens in this step) per row
    rows = [(40, 1), (0, BLOCK_TOKENS + 70), (9, 5), (2 * BLOCK_TOKENS + 3, 20), (7, 0), (0, 1),
            (3, 32), (5, 33), (0, 64), (11, 0)]
    lens = [c + n for c, n in rows]
    width = -(-max(lens) // page_size) + 1
    case = PagedCase(rng, lens, page_size, head_dim, kv_heads, width)
    seq = np.concatenate([np.full(n, b) for b, (_, n) in enumerate(rows)]).astype(np.int32)
    pos = np.concatenate([np.arange(c, c + n) for c, n in rows]).astype(np.int32)
    pad = 13
    seq, pos = np.concatenate([seq, np.full(pad, -1, np.int32)]), np.concatenate(
        [pos, np.zeros(pad, np.int32)])
    order = rng.permutation(len(seq))
    seq, pos = seq[order], pos[order]
    q = normal(rng, len(seq), HEADS, head_dim)
    meta = ChunkedMetadata(positions=jnp.asarray(pos), token_seq=jnp.asarray(seq),
                           slot_mapping=jnp.zeros(len(seq), jnp.int32),
                           block_tables=jnp.asarray(case.tables),
                           last_token_idx=jnp.zeros(len(rows), jnp.int32))
    out = run(XLAAttention().chunked, q, case.k, case.v, jnp.int32(LAYER), meta)
    assert_close(out, case.reference(q, seq, pos), f"chunked page_size={page_size}")


def test_chunked_long_chunk_memory_is_bounded():
    """opt-125m shapes: a 2048-token chunk over 2048 cached tokens. Reading each token's whole
    page list would need [T, context, H, D] temporaries (24 GiB); blocks need a few MiB."""
    t, context, page_size, heads, head_dim = 2048, 2048, 16, 12, 64
    width = (context + t) // page_size
    num_pages = width + 8
    f32, i32 = jnp.float32, jnp.int32
    cache = jax.ShapeDtypeStruct((12, num_pages, page_size, heads, head_dim), f32)
    q = jax.ShapeDtypeStruct((t, heads, head_dim), f32)
    meta = ChunkedMetadata(*(jax.ShapeDtypeStruct(s, i32) for s in [(t,), (t,), (t,), (8, width),
                                                                       (8,)]))
    compiled = jax.jit(XLAAttention().chunked).lower(q, cache, cache, jax.ShapeDtypeStruct(
        (), i32), meta).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    assert stats.temp_size_in_bytes < 64 << 20, f"{stats.temp_size_in_bytes / 2**20:.0f} MiB"
