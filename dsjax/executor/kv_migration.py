"""Moving a request's KV pages from one instance to another, shard by shard, for any TP/PP pair.

`jax.device_put` between shardings whose shards differ (prefill TP 2 -> decode TP 1, or PP
stages holding other layers) falls back to fetching the whole array to the host. We avoid that
by copying shard by shard: every destination device receives, from each source shard that holds
part of its (layers, heads) box, exactly that part, sliced on the source device and copied with a
single-device `device_put`; the pieces are joined on the destination device and assembled into
the destination's sharded array.

Two transports share that reshard:
- `LocalKVLink` (instances in one process): the exported shards are the source's device arrays,
  handed over by reference; the copy is a device-to-device `device_put`.
- `dsjax.executor.remote_kv.TransferServerKVLink` (instances in separate processes): the source
  offers its shards on a JAX transfer server and the destination pulls them.

The source side exports (gathers the pages into fresh arrays, so it may reuse its pages at once);
the destination side imports into pages it has allocated.

Boxes count heads in the model's KV heads: where tensor parallelism exceeds them, a cache holds
each KV head repeated (one per device), so a source may offer one head several times (any copy
will do) and a destination may need one head on several devices.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

import numpy as np

from dsjax.executor.kv_cache import HEAD_AXIS
from dsjax.executor.parallel import KV_SPEC, layer_ranges

LAYER_AXIS = 0


@dataclasses.dataclass(frozen=True)
class ShardBox:
    """Where one shard sits in global model coordinates: layers [l0, l1), KV heads [h0, h1)
    (the model's heads, whatever the cache's repetition)."""
    l0: int
    l1: int
    h0: int
    h1: int


@dataclasses.dataclass
class PageShard:
    """One device's part of a request's exported K and V pages."""
    box: ShardBox
    k: jax.Array   # [l1-l0, n_pages, page_size, h1-h0, head_dim] on one device
    v: jax.Array


def _box(shard_index, shape, layer_offset, repeat: int) -> ShardBox:
    """A shard's box; `repeat`: cache heads per model KV head (1 unless tp exceeds them, and
    then a shard holds one cache head)."""
    layers, heads = shard_index[LAYER_AXIS], shard_index[HEAD_AXIS]
    l0, l1, _ = layers.indices(shape[LAYER_AXIS])
    h0, h1, _ = heads.indices(shape[HEAD_AXIS])
    return ShardBox(l0 + layer_offset, l1 + layer_offset, h0 // repeat, (h1 - 1) // repeat + 1)


def export_shards(runner, block_ids) -> list[PageShard]:
    """Copies of the request's pages on the source's devices, one entry per device shard."""
    shards = []
    for stage, (k, v) in zip(runner.stages, runner.gather_pages(block_ids)):
        # (a stage's kv_head_repeat: heads per model KV head in the arrays its pages move as;
        # 1 in a stage actor's, stage_group.RemoteStage)
        start, repeat = stage.layer_range[0], stage.kv_head_repeat
        for ks, vs in zip(k.addressable_shards, v.addressable_shards):
            shards.append(PageShard(_box(ks.index, k.shape, start, repeat), ks.data, vs.data))
    return shards


def reshard_pages(shards: list[PageShard], dst_runner) -> list[tuple[jax.Array, jax.Array]]:
    """Exported shards -> the same pages laid out for each of the destination's stages."""
    _, n, page, _, head_dim = shards[0].k.shape
    mc = dst_runner.config
    out = []
    for stage in dst_runner.stages:
        d0, d1 = stage.layer_range
        repeat = stage.kv_head_repeat
        sharding = NamedSharding(stage.mesh, KV_SPEC)
        shape = (d1 - d0, n, page, mc.num_key_value_heads * repeat, head_dim)
        k_parts, v_parts = [], []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            want = _box(index, shape, d0, repeat)
            k_rows, v_rows = [], []
            # Walk layers in order; for each source span of layers, join its heads, each
            # taken once (a repeated head is offered by several shards).
            spans = sorted({(max(s.box.l0, d0), min(s.box.l1, d1)) for s in shards
                            if s.box.l0 < d1 and s.box.l1 > d0})
            for a, b in spans:
                k_heads, v_heads = [], []
                covered = want.h0
                for s in sorted(shards, key=lambda s: s.box.h0):
                    box = s.box
                    if not (box.l0 <= a and b <= box.l1 and box.h0 <= covered < box.h1):
                        continue
                    upto = min(want.h1, box.h1)
                    sel = (slice(a - box.l0, b - box.l0), slice(None), slice(None),
                           slice(covered - box.h0, upto - box.h0))
                    # A whole shard (matching layouts) moves as it is: slicing it anyway cost
                    # a dispatched copy of K and of V per pull.
                    whole = (b - a, upto - covered) == (s.k.shape[LAYER_AXIS],
                                                        s.k.shape[HEAD_AXIS])
                    k_heads.append(jax.device_put(s.k if whole else s.k[sel], device))
                    v_heads.append(jax.device_put(s.v if whole else s.v[sel], device))
                    covered = upto
                    if covered == want.h1:
                        break
                k_rows.append(_join(k_heads, HEAD_AXIS))
                v_rows.append(_join(v_heads, HEAD_AXIS))
            k_parts.append(_join(k_rows, LAYER_AXIS))
            v_parts.append(_join(v_rows, LAYER_AXIS))
        out.append((jax.make_array_from_single_device_arrays(shape, sharding, k_parts),
                    jax.make_array_from_single_device_arrays(shape, sharding, v_parts)))
    return out


@dataclasses.dataclass(frozen=True)
class SourceLayout:
    """An instance whose KV a destination pulls, as the reshard meets its shards: its degrees,
    and where the shards are when they are resharded: on its own devices (one process), or,
    None, pulled onto the destination's first device (TransferServerKVLink.receive).
    `joined_stages`: its stages after the first are stage actors (Ray), each of which exports
    its pages with every model KV head once, joined on one device (its head process's relay,
    the first of `devices`), not one shard per device."""
    tp: int
    pp: int
    devices: tuple | None = None
    joined_stages: bool = False

    def matches(self, runner) -> bool:
        """Whether its shards are the destination's: each lands whole, with no slice or join
        to compile."""
        return (self.tp, self.pp) == (runner.spec.tp, runner.spec.pp) and (
            self.tp == 1 or self.joined_stages == joins_later_stages(runner))


def _is_stage_actor(stage) -> bool:
    """A stage in a stage actor (stage_group.RemoteStage): its pages move as one array on
    the head's relay device, holding each of the model's KV heads once."""
    return getattr(stage, "relay", None) is not None


def joins_later_stages(runner) -> bool:
    """Whether the runner's stages after the first live in stage actors."""
    return any(map(_is_stage_actor, runner.stages[1:]))


def layout_shards(runner, layout: SourceLayout, num_pages: int) -> list[PageShard]:
    """Zero shards of num_pages pages of runner's model, cut as `layout` exports them and placed
    where they arrive: what warm-up reshards to compile the pulls from that layout."""
    mc = runner.config
    cache_heads = mc.cache_kv_heads(layout.tp)
    repeat, per_device = mc.kv_head_repeat(layout.tp), cache_heads // layout.tp
    landing = runner.stages[0].mesh.devices.flat[0]
    shards = []
    for s, (l0, l1) in enumerate(layer_ranges(mc.num_hidden_layers, layout.pp)):
        stage_shape = (l1 - l0, num_pages, runner.page_size, cache_heads, mc.head_dim)
        joined = layout.joined_stages and s > 0
        for d in range(1 if joined else layout.tp):
            if not layout.devices:
                device = landing
            else:
                device = layout.devices[0 if joined else s * layout.tp + d]
            heads = mc.num_key_value_heads if joined else per_device
            zeros = jax.device_put(np.zeros(stage_shape[:HEAD_AXIS] + (heads, mc.head_dim),
                                            runner.dtype), device)
            index = [slice(None)] * len(stage_shape)   # as KV_SPEC shards a stage's pages
            index[HEAD_AXIS] = slice(d * heads, (d + 1) * heads)
            shards.append(PageShard(_box(tuple(index), stage_shape, l0, 1 if joined else repeat),
                                    zeros, zeros))
    return shards


def _join(parts, axis):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def shards_nbytes(shards: list[PageShard], num_blocks: int) -> int:
    """Bytes of the request's real pages, each box once (the export pads the page count to a
    power of two, and may offer a repeated KV head several times)."""
    padded = shards[0].k.shape[1]
    unique = {s.box: s.k.nbytes + s.v.nbytes for s in shards}
    return sum(unique.values()) * num_blocks // max(1, padded)


def arrays_of(shards: list[PageShard]) -> list[jax.Array]:
    """What an import waits for before it touches the destination's pages."""
    return [a for s in shards for a in (s.k, s.v)]


class KVPullFailed(RuntimeError):
    """A request's KV could not be pulled from its source (dead, cut off, or too slow)."""


def await_arrival(arrays: list[jax.Array], timeout_s: float, source: str) -> None:
    """Wait until every array has arrived, or raise KVPullFailed naming `source`.

    Polls (backing off to 5 ms) rather than blocks: a blocking wait on a stalled source could
    never be abandoned and would keep its thread for good."""
    deadline, pause = time.monotonic() + timeout_s, 0.0002
    while not all(a.is_ready() for a in arrays):
        if time.monotonic() > deadline:
            raise KVPullFailed(f"KV pull from {source} took over {timeout_s:g} s: the source "
                               f"is dead, frozen or cut off")
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
    try:
        jax.block_until_ready(arrays)   # raises if the transfer failed (the source died)
    except Exception as e:  # noqa: BLE001 - the transport's error, as the request's
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise KVPullFailed(f"KV pull from {source} failed: {type(e).__name__}: "
                           f"{first_line}") from e



def land_shards(runner, shards: list[PageShard], dst_blocks, pages=None) -> int:
    """Write arrived shards into the destination's pages; returns the bytes moved. `pages`:
    reshard_pages(shards, runner) when the caller made them already (off its step loop)."""
    runner.insert_pages(dst_blocks, reshard_pages(shards, runner) if pages is None else pages)
    return shards_nbytes(shards, len(dst_blocks))


class LocalKVLink:
    """KV between instances of one process: exported shards travel by reference.

    Imports come in two halves, so a slow or dead source never stalls the destination's steps:
    receive() starts the transfer and returns the shards (device arrays that may still be
    arriving); once every array is ready the worker lands them (land_shards)."""

    def export(self, runner, block_ids) -> list[PageShard]:
        return export_shards(runner, block_ids)

    def receive(self, runner, payload: list[PageShard]) -> list[PageShard]:
        return payload

    def import_pages(self, runner, payload, dst_blocks) -> int:
        """Both halves at once (benchmarks, tests): waits for the data."""
        shards = self.receive(runner, payload)
        jax.block_until_ready(arrays_of(shards))
        return land_shards(runner, shards, dst_blocks)

    def discard(self, payload) -> None:
        """An export nobody will import (the request ended meanwhile): nothing to release."""

    def close(self) -> None:
        pass


def migrate(src_runner, src_blocks, dst_runner, dst_blocks) -> int:
    """Copy pages from src_runner to dst_runner in one process; returns the bytes moved."""
    link = LocalKVLink()
    return link.import_pages(dst_runner, link.export(src_runner, src_blocks), dst_blocks)
