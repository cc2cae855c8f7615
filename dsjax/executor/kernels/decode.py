"""Paged decode attention with split-KV (flash-decoding).

One query token per sequence. Grid: (sequence, query head, KV split). A split owns a contiguous
run of the sequence's block-table entries; it streams them `pages_per_block` pages at a time,
gathering K/V rows straight out of the whole cache (layer folded into the page index, so no
layer slice is copied), and keeps an online softmax. It writes its normalised partial output
and its log-sum-exp; `combine_splits` merges the splits exactly:
    out = sum_s exp(lse_s - max lse) * o_s / sum_s exp(lse_s - max lse).
Splits that start past the sequence's length do no loads and report lse = -inf.
Keys at or past context_len (the tail of the last page, unused table entries, whole pages of
garbage) are excluded by `where`, and their values are zeroed, so even NaN there cannot leak.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsjax.executor.kernels._compat import compiler_params, head_dim_chunks, is_power_of_two, out_struct

_M_INIT = -1e30  # finite running-max start: see prefill.py


def _decode_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                   page_size: int, pages_per_block: int, chunks):
    split = pl.program_id(2)
    pages_per_split = table_ref.shape[0]
    block_tokens = pages_per_block * page_size
    length = len_ref[0]
    split_first_page = split * pages_per_split
    split_end_page = jnp.minimum((length + page_size - 1) // page_size,
                                 split_first_page + pages_per_split)
    num_blocks = jnp.maximum(split_end_page - split_first_page + pages_per_block - 1, 0
                             ) // pages_per_block
    q_parts = [q_ref[pl.ds(c0, cs)] for c0, cs in chunks]  # float32, pre-scaled

    def load_rows(ref, pages, c0, cs):
        return ref[pages, :, pl.ds(c0, cs)].reshape(block_tokens, cs).astype(jnp.float32)

    def body(j, carry):
        accs, m_prev, l_prev = carry
        pages = table_ref[pl.ds(j * pages_per_block, pages_per_block)]
        token = (split_first_page + j * pages_per_block) * page_size + jnp.arange(block_tokens)
        visible = token < length
        s = None
        for qp, (c0, cs) in zip(q_parts, chunks):
            part = jnp.sum(load_rows(k_ref, pages, c0, cs) * qp[None, :], axis=1)
            s = part if s is None else s + part
        s = jnp.where(visible, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next)
        l_next = alpha * l_prev + jnp.sum(p)
        new_accs = []
        for acc, (c0, cs) in zip(accs, chunks):
            v = jnp.where(visible[:, None], load_rows(v_ref, pages, c0, cs), 0.0)
            new_accs.append(alpha * acc + jnp.sum(p[:, None] * v, axis=0))
        return tuple(new_accs), m_next, l_next

    accs = tuple(jnp.zeros((cs,), jnp.float32) for _, cs in chunks)
    accs, m, l = jax.lax.fori_loop(0, num_blocks, body,
                                   (accs, jnp.float32(_M_INIT), jnp.float32(0.0)))
    seen = l > 0
    inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    for acc, (c0, cs) in zip(accs, chunks):
        o_ref[pl.ds(c0, cs)] = acc * inv_l
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    lse_ref[...] = jnp.full((1,), lse, jnp.float32)


def combine_splits(o_splits, lse):
    """Exact merge of per-split softmax results. o_splits [B, H, S, D], lse [B, H, S] -> [B, H, D].

    Rows where every split was empty (context_len 0) come out as 0.
    """
    m = jnp.max(lse, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = w / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhs,bhsd->bhd", w, o_splits)


def choose_num_splits(batch: int, num_heads: int, num_blocks: int,
                      target_programs: int = 528) -> int:
    """Enough splits to give the GPU ~4 programs per SM (132 SMs on H100), never more splits than
    KV blocks. Small batches with long contexts get many splits, big batches get one."""
    wanted = -(-target_programs // max(batch * num_heads, 1))
    return max(1, min(wanted, num_blocks, 64))


@functools.partial(jax.jit, static_argnames=("pages_per_block", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def paged_decode_attention(q, k_cache, v_cache, layer, block_tables, context_lens, *,
                           pages_per_block: int | None = None, num_splits: int | None = None,
                           num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """q [B, H, D] against cache [L, P, S, Hkv, D] of `layer` through block_tables [B, W]
    (page ids; entries past a sequence's length may be any value) and context_lens [B] -> [B, H, D].
    """
    batch, num_heads, head_dim = q.shape
    num_layers, num_pages, page_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not divisible by {num_kv_heads} KV heads")
    if not is_power_of_two(page_size):
        raise ValueError(f"page_size={page_size} must be a power of two for the Pallas decode "
                         "kernel (or use the 'xla' backend)")
    chunks = head_dim_chunks(head_dim)
    group = num_heads // num_kv_heads
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    max_pages = block_tables.shape[1]
    num_blocks = pl.cdiv(max_pages, pages_per_block)
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_heads, num_blocks)
    num_splits = max(1, min(num_splits, num_blocks))
    pages_per_split = pl.cdiv(num_blocks, num_splits) * pages_per_block

    # Fold the layer into the page index: [L, P, ...] -> [L*P, ...] is a free reshape, so the
    # kernel reads the layer in place. Clipping keeps junk table entries inside the cache.
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1) + layer * num_pages
    tables = jnp.pad(tables, ((0, 0), (0, pages_per_split * num_splits - max_pages)),
                     constant_values=0)
    flat = lambda c: c.reshape(num_layers * num_pages, page_size, num_kv_heads, head_dim)  # noqa

    kernel = functools.partial(_decode_kernel, page_size=page_size,
                               pages_per_block=pages_per_block, chunks=chunks)
    cache_spec = pl.BlockSpec((num_layers * num_pages, page_size, None, head_dim),
                              lambda b, h, s: (0, 0, h // group, 0))
    # Scaled in float32 outside: B*H*D values, and no extra rounding of q in half precision.
    q_scaled = q.astype(jnp.float32) * head_dim ** -0.5
    inputs = (context_lens.astype(jnp.int32), tables, q_scaled, flat(k_cache), flat(v_cache))
    o_splits, lse = pl.pallas_call(
        kernel,
        grid=(batch, num_heads, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (b,)),                          # context_lens
            pl.BlockSpec((None, pages_per_split), lambda b, h, s: (b, s)),     # block tables
            pl.BlockSpec((None, None, head_dim), lambda b, h, s: (b, h, 0)),   # q
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, head_dim), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, 1), lambda b, h, s: (b, h, s)),
        ],
        out_shape=[
            out_struct((batch, num_heads, num_splits, head_dim), jnp.float32, *inputs),
            out_struct((batch, num_heads, num_splits), jnp.float32, *inputs),
        ],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="dsjax_paged_decode",
    )(*inputs)
    if num_splits == 1:  # the kernel already wrote 0 for empty rows
        return o_splits[:, :, 0].astype(q.dtype)
    return combine_splits(o_splits, lse).astype(q.dtype)
