"""Tensor-parallel wrapper for kernel attention backends.

GSPMD partitions the XLA reference's einsums by heads on its own, but a Pallas call is opaque to
it: under a heads-sharded mesh it must run per device on the local heads. `HeadShardedAttention`
does that with shard_map: queries, fresh K/V and the page pools are split on their head axis,
metadata is replicated, and each device's kernel sees only its heads.
"""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, PartitionSpec as P

from dsjax.executor.parallel import KV_SPEC, TP_AXIS

HEADS = P(None, TP_AXIS, None)  # [tokens, heads, head_dim]


@dataclasses.dataclass(frozen=True)
class HeadShardedAttention:
    inner: object
    mesh: Mesh

    def _map(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    def write_kv(self, k_cache, v_cache, layer, k, v, slot_mapping):
        return self._map(self.inner.write_kv, (KV_SPEC, KV_SPEC, P(), HEADS, HEADS, P()),
                         (KV_SPEC, KV_SPEC))(k_cache, v_cache, layer, k, v, slot_mapping)

    def prefill(self, q, k, v, meta, **window):
        fn = lambda *a: self.inner.prefill(*a, **window)  # noqa: E731
        return self._map(fn, (HEADS, HEADS, HEADS, P()), HEADS)(q, k, v, meta)

    def decode(self, q, k_cache, v_cache, layer, meta, **window):
        fn = lambda *a: self.inner.decode(*a, **window)  # noqa: E731
        return self._map(fn, (HEADS, KV_SPEC, KV_SPEC, P(), P()),
                         HEADS)(q, k_cache, v_cache, layer, meta)

    def chunked(self, q, k_cache, v_cache, layer, meta, **window):
        fn = lambda *a: self.inner.chunked(*a, **window)  # noqa: E731
        return self._map(fn, (HEADS, KV_SPEC, KV_SPEC, P(), P()),
                         HEADS)(q, k_cache, v_cache, layer, meta)


def for_mesh(attention, mesh: Mesh):
    """The backend to use on this stage mesh: XLA's partitions itself, kernels need shard_map."""
    from dsjax.models.attention import XLAAttention
    if isinstance(attention, XLAAttention) or mesh.devices.size == 1:
        return attention
    return HeadShardedAttention(attention, mesh)
