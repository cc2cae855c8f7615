"""Causal flash attention over a packed batch of prompts (one flat token axis).

Grid: (query block, query head). Each program keeps one [block_q, D] query tile and streams
key/value tiles of [block_k, D] with an online softmax (running max m, running sum l, float32
accumulator). The wrapper computes, per query block, the key range it can see at all:
from the first token of the first prompt in the block to the block's last real token. Key
blocks outside that range (other prompts before it, everything causally after it, padding)
are never loaded: that is both the cross-prompt and the causal block skipping.
Inside a visited block an element mask (same prompt, key position <= query position)
handles the ragged edges.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsjax.executor.kernels._compat import compiler_params, head_dim_chunks, is_power_of_two, out_struct
from dsjax.models.attention import PrefillMetadata

# Running-max start value: finite so that a row that has seen only masked keys keeps
# exp(m_prev - m_next) == 1 instead of exp(-inf + inf) == NaN.
_M_INIT = -1e30


def _prefill_kernel(kv_lo_ref, kv_hi_ref, seg_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *,
                    sm_scale: float, block_q: int, block_k: int, chunks):
    qi = pl.program_id(0)
    q_rows = pl.ds(qi * block_q, block_q)
    q_seg = seg_ref[q_rows]
    q_pos = pos_ref[q_rows]
    q_parts = [q_ref[:, pl.ds(c0, cs)] for c0, cs in chunks]

    def body(kb, carry):
        accs, m_prev, l_prev = carry
        k_rows = pl.ds(kb * block_k, block_k)
        k_seg = seg_ref[k_rows]
        k_pos = pos_ref[k_rows]
        s = None
        for qp, (c0, cs) in zip(q_parts, chunks):
            part = jax.lax.dot_general(qp, k_ref[k_rows, pl.ds(c0, cs)],
                                       (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
            s = part if s is None else s + part
        s = s * sm_scale
        visible = ((q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] >= 0)
                   & (q_pos[:, None] >= k_pos[None, :]))
        # jnp.where (not multiplication) so NaN/inf from garbage keys cannot survive.
        s = jnp.where(visible, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        key_is_real = (k_seg >= 0)[:, None]
        new_accs = []
        for acc, (c0, cs) in zip(accs, chunks):
            # 0 * NaN is NaN: padding values are zeroed, not just given weight 0.
            v = jnp.where(key_is_real, v_ref[k_rows, pl.ds(c0, cs)], 0)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            new_accs.append(alpha[:, None] * acc + pv)
        return tuple(new_accs), m_next, l_next

    accs = tuple(jnp.zeros((block_q, cs), jnp.float32) for _, cs in chunks)
    m0 = jnp.full((block_q,), _M_INIT, jnp.float32)
    l0 = jnp.zeros((block_q,), jnp.float32)
    first_block = kv_lo_ref[0] // block_k
    end_block = (kv_hi_ref[0] + block_k - 1) // block_k
    accs, _, l = jax.lax.fori_loop(first_block, end_block, body, (accs, m0, l0))

    # Rows that saw nothing (padding) get 0, never 0/0.
    inv_l = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    for acc, (c0, cs) in zip(accs, chunks):
        o_ref[:, pl.ds(c0, cs)] = (acc * inv_l[:, None]).astype(o_ref.dtype)


def _visible_key_ranges(meta: PrefillMetadata, padded_len: int, block_q: int):
    """Per query block: [first key of its first prompt, last real query token + 1)."""
    num_tokens = meta.seq_ids.shape[0]
    seg = jnp.pad(meta.seq_ids, (0, padded_len - num_tokens), constant_values=-1)
    is_real = seg >= 0
    token = jnp.arange(padded_len, dtype=jnp.int32)
    prompt_start = meta.cu_seqlens[jnp.maximum(seg, 0)]
    big = jnp.int32(padded_len)
    lo = jnp.where(is_real, prompt_start, big).reshape(-1, block_q).min(axis=1)
    hi = jnp.where(is_real, token + 1, 0).reshape(-1, block_q).max(axis=1)
    lo = jnp.minimum(lo, hi)  # blocks without real tokens: empty range
    return lo.astype(jnp.int32), hi.astype(jnp.int32), seg


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def prefill_attention(q, k, v, meta: PrefillMetadata, *, block_q: int = 64, block_k: int = 64,
                      num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Causal attention inside each packed prompt. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D].

    Tokens of prompt i are cu_seqlens[i]:cu_seqlens[i+1]; seq_ids == -1 marks padding (output 0).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not divisible by {num_kv_heads} KV heads")
    if not (is_power_of_two(block_q) and is_power_of_two(block_k)):
        raise ValueError(f"block_q={block_q}, block_k={block_k}: both must be powers of two")
    chunks = head_dim_chunks(head_dim)
    group = num_heads // num_kv_heads
    tile = max(block_q, block_k)
    padded_len = pl.cdiv(num_tokens, tile) * tile
    kv_lo, kv_hi, seg = _visible_key_ranges(meta, padded_len, block_q)
    pad = ((0, padded_len - num_tokens),)
    pos = jnp.pad(meta.positions.astype(jnp.int32), pad)
    # A no-op when the runner's token bucket is already a multiple of the tile.
    q, k, v = (jnp.pad(x, pad + ((0, 0), (0, 0))) for x in (q, k, v))

    kernel = functools.partial(_prefill_kernel, sm_scale=head_dim ** -0.5, block_q=block_q,
                               block_k=block_k, chunks=chunks)
    whole = lambda n: pl.BlockSpec((n,), lambda i, h: (0,))  # noqa: E731
    inputs = (kv_lo, kv_hi, seg, pos, q, k, v)
    out = pl.pallas_call(
        kernel,
        grid=(padded_len // block_q, num_heads),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h: (i,)),                       # kv_lo
            pl.BlockSpec((1,), lambda i, h: (i,)),                       # kv_hi
            whole(padded_len),                                           # seq ids
            whole(padded_len),                                           # positions
            pl.BlockSpec((block_q, None, head_dim), lambda i, h: (i, h, 0)),
            pl.BlockSpec((padded_len, None, head_dim), lambda i, h: (0, h // group, 0)),
            pl.BlockSpec((padded_len, None, head_dim), lambda i, h: (0, h // group, 0)),
        ],
        out_specs=pl.BlockSpec((block_q, None, head_dim), lambda i, h: (i, h, 0)),
        out_shape=out_struct((padded_len, num_heads, head_dim), q.dtype, *inputs),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="dsjax_packed_prefill",
    )(*inputs)
    return out[:num_tokens]
