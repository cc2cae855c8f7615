"""`PallasAttention`: the models.attention.AttentionBackend built on the Pallas kernels,
and `get_attention_backend`, the one place that picks a backend by name.

A Mosaic GPU (Hopper, wgmma/TMA) variant plugs in here: give it the same four methods (or
swap only `prefill`/`decode` for kernels in their own modules) and a name in
`get_attention_backend`; callers never see the difference.
"""
from __future__ import annotations

import jax
from flax import struct

from dsjax.executor.kernels.decode import paged_decode_attention
from dsjax.executor.kernels.prefill import prefill_attention
from models.attention import (ChunkedMetadata, DecodeMetadata, PrefillMetadata, XLAAttention,
                              write_kv_scatter)

BACKEND_NAMES = ("auto", "xla", "pallas")


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

    def prefill(self, q, k, v, meta: PrefillMetadata):
        return prefill_attention(q, k, v, meta, block_q=self.prefill_block_q,
                                 block_k=self.prefill_block_k,
                                 num_warps=self.prefill_num_warps,
                                 num_stages=self.prefill_num_stages, interpret=self.interpret)

    def decode(self, q, k_cache, v_cache, layer, meta: DecodeMetadata):
        return paged_decode_attention(q, k_cache, v_cache, layer, meta.block_tables,
                                      meta.context_lens,
                                      pages_per_block=self.decode_pages_per_block,
                                      num_splits=self.decode_splits,
                                      num_warps=self.decode_num_warps,
                                      num_stages=self.decode_num_stages,
                                      interpret=self.interpret)

    def chunked(self, q, k_cache, v_cache, layer, meta: ChunkedMetadata):
        # Chunked-prefill steps are small and rare in disaggregated serving; the reference will do.
        return XLAAttention().chunked(q, k_cache, v_cache, layer, meta)


def get_attention_backend(name: str = "auto", interpret: bool | None = None):
    """"auto": Pallas on GPU, XLA elsewhere. "pallas": Pallas everywhere (interpreted off GPU
    unless `interpret` says otherwise). "xla": the plain-jnp reference."""
    on_gpu = jax.default_backend() == "gpu"
    if name == "xla" or (name == "auto" and not on_gpu):
        return XLAAttention()
    if name in ("pallas", "auto"):
        return PallasAttention(interpret=(not on_gpu) if interpret is None else interpret)
    raise ValueError(f"unknown attention backend {name!r}: pass one of {BACKEND_NAMES}")
