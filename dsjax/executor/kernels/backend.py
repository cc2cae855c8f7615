"""`PallasAttention`: the dsjax.models.attention.AttentionBackend built on the Pallas kernels,
and `get_attention_backend`, the one place that picks a backend by name.

A Mosaic GPU (Hopper, wgmma/TMA) variant plugs in here: give it the same four methods (or
swap only `prefill`/`decode` for kernels in their own modules) and a name in
`get_attention_backend`; callers never see the difference.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsjax.executor.kernels.decode import paged_decode_attention
from dsjax.executor.kernels.prefill import prefill_attention
from dsjax.models.attention import (ChunkedMetadata, DecodeMetadata, PrefillMetadata,
                                    XLAAttention, write_kv_scatter)

BACKEND_NAMES = ("auto", "xla", "pallas")
WINDOW_UNSUPPORTED = ("the Pallas attention kernels do not implement sliding windows (this "
                      "model sets one): use attention_backend='xla' or 'auto'")


@struct.dataclass
class PallasAttention:
    """Flash prefill over packed prompts and split-KV paged decode. Hashable (static fields only).

    interpret=True runs the kernels through the Pallas interpreter (CPU, tests).
    decode_splits=None picks the split count from batch and heads (see decode.choose_num_splits).
    """
    interpret: bool = struct.field(pytree_node=False, default=False)
    prefill_block_q: int = struct.field(pytree_node=False, default=128)
    prefill_block_k: int = struct.field(pytree_node=False, default=64)
    prefill_num_warps: int = struct.field(pytree_node=False, default=8)
    prefill_num_stages: int = struct.field(pytree_node=False, default=2)
    decode_pages_per_block: int | None = struct.field(pytree_node=False, default=None)
    decode_splits: int | None = struct.field(pytree_node=False, default=None)
    decode_num_warps: int = struct.field(pytree_node=False, default=4)
    decode_num_stages: int = struct.field(pytree_node=False, default=2)

    def write_kv(self, k_cache, v_cache, layer, k, v, slot_mapping):
        # XLA's scatter writes only the new rows in place (with the cache donated); a Pallas
        # copy kernel has nothing to win on a write of N * Hkv * D elements.
        return write_kv_scatter(k_cache, v_cache, layer, k, v, slot_mapping)

    @staticmethod
    def _no_window(window) -> None:
        if window is not None:
            raise NotImplementedError(WINDOW_UNSUPPORTED)

    def prefill(self, q, k, v, meta: PrefillMetadata, window=None):
        self._no_window(window)
        return prefill_attention(q, k, v, meta, block_q=self.prefill_block_q,
                                 block_k=self.prefill_block_k,
                                 num_warps=self.prefill_num_warps,
                                 num_stages=self.prefill_num_stages, interpret=self.interpret)

    def decode(self, q, k_cache, v_cache, layer, meta: DecodeMetadata, window=None):
        self._no_window(window)
        return paged_decode_attention(q, k_cache, v_cache, layer, meta.block_tables,
                                      meta.context_lens,
                                      pages_per_block=self.decode_pages_per_block,
                                      num_splits=self.decode_splits,
                                      num_warps=self.decode_num_warps,
                                      num_stages=self.decode_num_stages,
                                      interpret=self.interpret)

    def chunked(self, q, k_cache, v_cache, layer, meta: ChunkedMetadata, window=None):
        # Chunked-prefill steps are small and rare in disaggregated serving; the reference will do.
        self._no_window(window)
        return XLAAttention().chunked(q, k_cache, v_cache, layer, meta)


def self_check(backend, num_heads: int = 4, head_dim: int = 64, page_size: int = 16,
               dtype=jnp.float32, num_kv_heads: int | None = None) -> str | None:
    """Run `backend`'s prefill and paged decode on a few random shapes of this model (mixed
    prompt lengths, junk in unused pages) beside the XLA reference on this device. Returns
    what went wrong, or None when both agree within the dtype's tolerance."""
    tol = 2e-2 if jnp.dtype(dtype).itemsize < 4 else 2e-3
    reference = XLAAttention()
    rng = np.random.default_rng(0)
    lens = [37, 5, 130]
    total, pages = sum(lens), sum(-(-n // page_size) for n in lens)
    num_kv_heads = num_kv_heads or num_heads
    q = jnp.asarray(rng.normal(size=(total, num_heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(total, num_kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(total, num_kv_heads, head_dim)), dtype)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    seq_ids = np.repeat(np.arange(len(lens)), lens).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    slots = np.arange(total, dtype=np.int32)   # unused here: prefill reads q, k, v directly
    prefill = PrefillMetadata(jnp.asarray(positions), jnp.asarray(seq_ids), jnp.asarray(cu),
                              jnp.asarray(slots), jnp.asarray(cu[1:] - 1))
    cache_shape = (1, pages + 2, page_size, num_kv_heads, head_dim)
    k_cache = jnp.asarray(rng.normal(size=cache_shape) * 50, dtype)   # junk beyond contexts
    v_cache = jnp.asarray(rng.normal(size=cache_shape) * 50, dtype)
    width = max(-(-n // page_size) for n in lens)
    tables = np.zeros((len(lens), width), np.int32)
    at = 0
    for i, n in enumerate(lens):
        blocks = -(-n // page_size)
        tables[i, :blocks] = np.arange(at, at + blocks)[::-1]   # pages in shuffled order
        at += blocks
    decode = DecodeMetadata(jnp.asarray([n - 1 for n in lens], jnp.int32), jnp.zeros(3, jnp.int32),
                            jnp.asarray(tables), jnp.asarray(lens, jnp.int32))
    q_dec = q[cu[1:] - 1]
    try:
        checks = [("prefill", backend.prefill(q, k, v, prefill),
                   reference.prefill(q, k, v, prefill)),
                  ("decode", backend.decode(q_dec, k_cache, v_cache, 0, decode),
                   reference.decode(q_dec, k_cache, v_cache, 0, decode))]
        for what, got, want in checks:
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            if not err <= tol:
                return f"{what} differs from the XLA reference by {err:.3g} (tolerance {tol})"
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run here
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None


def get_attention_backend(name: str = "auto", interpret: bool | None = None, *,
                          num_heads: int = 4, num_kv_heads: int | None = None, head_dim: int = 64,
                          page_size: int = 16, dtype=jnp.float32,
                          sliding_window: int | None = None):
    """"auto": Pallas on GPU once a self-check on this device agrees with the XLA reference
    (else XLA, with one warning saying why); XLA elsewhere, and for models with a sliding
    window. "pallas": Pallas everywhere (interpreted off GPU unless `interpret` says
    otherwise). "xla": the plain-jnp reference. The self-check uses the model's query and KV
    heads per device, head_dim, page size and dtype."""
    on_gpu = jax.default_backend() == "gpu"
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}: pass one of {BACKEND_NAMES}")
    if name == "pallas" and sliding_window is not None:
        raise ValueError(WINDOW_UNSUPPORTED)
    if name == "xla" or (name == "auto" and (not on_gpu or sliding_window is not None)):
        return XLAAttention()
    kernels = PallasAttention(interpret=(not on_gpu) if interpret is None else interpret)
    if name == "pallas":
        return kernels
    return checked_or_reference(kernels, num_heads, num_kv_heads or num_heads, head_dim,
                                page_size, jnp.dtype(dtype))


@functools.cache
def checked_or_reference(kernels, num_heads, num_kv_heads, head_dim, page_size, dtype):
    """The kernels if they pass the self-check on this device, else the XLA reference."""
    problem = self_check(kernels, num_heads, head_dim, page_size, dtype, num_kv_heads)
    if problem is None:
        return kernels
    warnings.warn(f"the Pallas attention kernels failed their start-up check on "
                  f"{jax.devices()[0].device_kind} ({problem}); using the XLA attention "
                  f"instead. Pass attention_backend='pallas' to use them anyway.",
                  RuntimeWarning, stacklevel=2)
    return XLAAttention()
