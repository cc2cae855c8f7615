"""Moving a request's KV pages from one instance's devices to another's, device to device.

`jax.device_put` between shardings whose shards differ (prefill TP 2 -> decode TP 1, or PP
stages holding other layers) falls back to fetching the whole array to the host. We avoid that
by copying shard by shard: every destination device receives, from each source shard that holds
part of its (layers, heads) box, exactly that part, sliced on the source device and copied with a
single-device `device_put`; the pieces are joined on the destination device and assembled into
the destination's sharded array.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from dsjax.executor.parallel import KV_SPEC

HEAD_AXIS, LAYER_AXIS = 3, 0


def _box(shard_index, shape, layer_offset):
    """(layer_start, layer_end, head_start, head_end) of a shard in global model coordinates."""
    layers, heads = shard_index[LAYER_AXIS], shard_index[HEAD_AXIS]
    l0, l1, _ = layers.indices(shape[LAYER_AXIS])
    h0, h1, _ = heads.indices(shape[HEAD_AXIS])
    return l0 + layer_offset, l1 + layer_offset, h0, h1


def _source_shards(per_stage, src_ranges):
    """Every addressable shard of the source pages: (box, data array on its device)."""
    shards = []
    for (k, v), (start, _) in zip(per_stage, src_ranges):
        for ks, vs in zip(k.addressable_shards, v.addressable_shards):
            shards.append((_box(ks.index, k.shape, start), ks.data, vs.data))
    return shards


def reshard_pages(per_stage, src_ranges, dst_meshes, dst_ranges):
    """Pages gathered on the source stages -> the same pages laid out for the destination stages.

    per_stage: [(k, v)] per source stage, each [stage_layers, n, page_size, heads, head_dim]
    sharded by heads on that stage's mesh. Returns [(k, v)] per destination stage.
    """
    sources = _source_shards(per_stage, src_ranges)
    _, n, page, heads, head_dim = per_stage[0][0].shape
    out = []
    for mesh, (d0, d1) in zip(dst_meshes, dst_ranges):
        sharding = NamedSharding(mesh, KV_SPEC)
        shape = (d1 - d0, n, page, heads, head_dim)
        k_parts, v_parts = [], []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            _, _, h0, h1 = _box(index, shape, d0)
            k_rows, v_rows = [], []
            # Walk layers in order; for each source stage's layer span, join its heads.
            spans = sorted({(max(l0, d0), min(l1, d1)) for (l0, l1, _, _), _, _ in sources
                            if l0 < d1 and l1 > d0})
            for a, b in spans:
                k_heads, v_heads = [], []
                for (l0, l1, s0, s1), kd, vd in sorted(sources, key=lambda s: s[0][2]):
                    if not (l0 <= a and b <= l1 and s0 < h1 and s1 > h0):
                        continue
                    sel = (slice(a - l0, b - l0), slice(None), slice(None),
                           slice(max(h0, s0) - s0, min(h1, s1) - s0))
                    k_heads.append(jax.device_put(kd[sel], device))
                    v_heads.append(jax.device_put(vd[sel], device))
                k_rows.append(_join(k_heads, HEAD_AXIS))
                v_rows.append(_join(v_heads, HEAD_AXIS))
            k_parts.append(_join(k_rows, LAYER_AXIS))
            v_parts.append(_join(v_rows, LAYER_AXIS))
        out.append((jax.make_array_from_single_device_arrays(shape, sharding, k_parts),
                    jax.make_array_from_single_device_arrays(shape, sharding, v_parts)))
    return out


def _join(parts, axis):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def migrate(src_runner, src_blocks, dst_runner, dst_blocks) -> int:
    """Copy a request's pages from src_runner to dst_runner; returns the bytes moved."""
    pages = src_runner.gather_pages(src_blocks)
    moved = reshard_pages(pages, [s.layer_range for s in src_runner.stages],
                          [s.mesh for s in dst_runner.stages],
                          [s.layer_range for s in dst_runner.stages])
    dst_runner.insert_pages(dst_blocks, moved)
    per_page = sum(k.nbytes + v.nbytes for k, v in pages) // max(1, pages[0][0].shape[1])
    return per_page * len(src_blocks)
