"""Pipeline stages of one instance in separate processes (possibly on separate hosts).

The instance's head process runs the worker, the runner and its first stage; every later stage
is a `StageServer` in a process of its own (a Ray stage actor), holding that stage's layers,
params and page pool on its own devices. The head drives them through `RemoteStage`, a
stand-in with the `Stage` interface the runner uses (`run`, `pool.gather/insert`, `healthy`),
so the runner's step code does not know where a stage is.

What crosses between the processes:
- activations: stage s offers its output on its transfer server (`ArrayRef`: address, id,
  shapes); stage s+1 pulls it onto its own device. Calls return once the step is dispatched, so
  the head dispatches the next micro-batch while remote stages compute.
- host inputs (token ids, metadata, sampling rows) and the refs: the RPC's arguments.
- KV pages of a remote stage (migration, swap): pulled to, or offered from, one device of the
  head (the stage's `relay` device), where the runner's page code handles them like a local
  stage's pages.

The RPC is anything with StageServer's methods that calls them in order (ray_hosts adapts a Ray
actor handle); nothing here knows Ray.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from dsjax.executor.kv_cache import HEAD_AXIS
from dsjax.executor.parallel import (layer_ranges, param_shardings, stage_mesh,
                                     stage_param_tree)
from dsjax.executor.runner import Stage
from dsjax.executor.sampling import SampleOutput


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """Arrays waiting on a transfer server: where, under which id, their shapes and dtypes."""
    address: str
    transfer_id: int
    specs: tuple[tuple[tuple[int, ...], str], ...]


class TransferChannel:
    """This process's transfer server for activations and relayed pages, and its connections.
    Binds only `host` (the interface the cluster uses), never every interface."""

    def __init__(self, host: str):
        from jax.experimental import transfer
        self.server = transfer.start_transfer_server(jax.local_devices()[0].client,
                                                     f"{host}:0", [f"{host}:0"])
        self.address = self.server.address()
        self._connections = {}
        # Unique per server over the process's life (the pid keeps a restart's ids apart).
        self._ids = itertools.count((os.getpid() & 0xFFFF) << 40)

    def offer(self, arrays) -> ArrayRef:
        """Offer single-device arrays (ready or still computing) to one puller."""
        transfer_id = next(self._ids)
        # An empty array never completes a pull: the puller makes those itself.
        self.server.await_pull(transfer_id, [a for a in arrays if a.size])
        return ArrayRef(self.address, transfer_id,
                        tuple((tuple(a.shape), str(a.dtype)) for a in arrays))

    def pull(self, ref: ArrayRef, device) -> list[jax.Array]:
        """The arrays of `ref` on `device`; returns at once, the data lands asynchronously."""
        conn = self._connections.get(ref.address)
        if conn is None:
            conn = self._connections[ref.address] = self.server.connect(ref.address)
        sharding = SingleDeviceSharding(device)
        full = [math.prod(shape) > 0 for shape, _ in ref.specs]
        pulled = iter(conn.pull(ref.transfer_id, [
            jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for (shape, dtype), f in zip(ref.specs, full) if f]))
        return [next(pulled) if f else jax.device_put(jnp.zeros(shape, dtype), device)
                for (shape, dtype), f in zip(ref.specs, full)]


def first_shard(x: jax.Array) -> jax.Array:
    """The whole array on one of its devices: a shard when it is replicated (activations and
    samples are), else gathered there."""
    shard = x.addressable_shards[0]
    if x.sharding.is_fully_replicated:
        return shard.data
    return jax.device_put(x, SingleDeviceSharding(shard.device))


def join_heads(x: jax.Array, device, repeat: int) -> jax.Array:
    """A head-sharded page array as one array on `device` holding each model KV head once,
    shard by shard. `repeat`: cache heads per model KV head; above 1, each device holds one
    cache head (tp exceeds the model's KV heads), so every repeat-th shard is a distinct one."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[HEAD_AXIS].start or 0)
    parts = [jax.device_put(s.data, device) for s in shards[::repeat]]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=HEAD_AXIS)


def load_stage_params(load_params, config, dtype, layer_range, first, last, mesh):
    """One stage's params on `mesh`. The loader places whole tensors, so the full model loads
    on this stage's devices first and the other stages' layers are dropped."""
    full = load_params(param_shardings(config, config.abstract_params(dtype), mesh))
    part = stage_param_tree(full, layer_range, first, last, config)
    return jax.device_put(part, param_shardings(config, part, mesh))


def build_stage(config, devices, index, pp, load_params, *, dtype, num_pages, page_size,
                attention, num_slots) -> Stage:
    """Stage `index` of `pp` on `devices`, with its own layers and page pool."""
    layer_range = layer_ranges(config.num_hidden_layers, pp)[index]
    first, last = index == 0, index == pp - 1
    params = load_stage_params(load_params, config, dtype, layer_range, first, last,
                               stage_mesh(devices))
    return Stage(config, devices, layer_range, first, last, params, num_pages, page_size,
                 dtype, attention, num_slots)


class StageServer:
    """One pipeline stage in its own process: runs steps on pulled activations and moves its
    pages for the head."""

    def __init__(self, stage: Stage, channel: TransferChannel):
        self.stage, self.channel = stage, channel
        self.device = stage.mesh.devices.flat[0]
        # Pages leave and arrive with each model KV head once (kv_migration's boxes); the
        # pool holds one per device where tp exceeds them.
        self.head_repeat = stage.kv_head_repeat

    def run(self, mode, hidden: ArrayRef, inputs) -> ArrayRef:
        """Dispatch this stage's part of a step; its output waits on this server."""
        x = self.channel.pull(hidden, self.device)[0]
        out = self.stage.run(mode, x, inputs)
        return self.channel.offer([first_shard(a) for a in jax.tree_util.tree_leaves(out)])

    def fill_slot(self, slot: int, arrays: dict) -> None:
        self.stage.fill_slot(slot, arrays)

    def gather(self, block_ids) -> ArrayRef:
        k, v = self.stage.pool.gather(block_ids)
        return self.channel.offer([join_heads(x, self.device, self.head_repeat)
                                   for x in (k, v)])

    def insert(self, block_ids, pages: ArrayRef) -> None:
        k, v = self.channel.pull(pages, self.device)   # (the pool places and repeats them)
        self.stage.pool.insert(block_ids, k, v)

    def healthy(self) -> bool:
        return self.stage.healthy()


class RemoteStage:
    """The head's stand-in for a StageServer elsewhere. Its `mesh` is the relay device, so the
    runner's page code (migration, swap) lays this stage's pages out there."""

    def __init__(self, server, layer_range, first: bool, last: bool,
                 channel: TransferChannel, relay):
        self.server = server
        self.layer_range, self.first, self.last = layer_range, first, last
        self.channel, self.relay = channel, relay
        self.mesh = stage_mesh([relay])
        self.pool = self   # gather/insert below move the remote pool's pages via the relay
        # Its pages move with each model KV head once (StageServer.gather and insert).
        self.kv_head_repeat = 1

    def run(self, mode, hidden, inputs):
        """Returns an ArrayRef the next remote stage pulls, or the last stage's samples."""
        if not isinstance(hidden, ArrayRef):   # the output of the head's own stage
            hidden = self.channel.offer([first_shard(hidden)])
        out = self.server.run(mode, hidden, inputs)
        if not self.last:
            return out
        return SampleOutput(*self.channel.pull(out, self.relay))

    def fill_slot(self, slot: int, arrays: dict) -> None:
        self.server.fill_slot(slot, arrays)

    def gather(self, block_ids) -> tuple[jax.Array, jax.Array]:
        k, v = self.channel.pull(self.server.gather(block_ids), self.relay)
        return k, v

    def insert(self, block_ids, k_pages, v_pages) -> None:
        pages = [jax.device_put(a, self.relay) for a in (k_pages, v_pages)]
        self.server.insert(block_ids, self.channel.offer(pages))

    def healthy(self) -> bool:
        try:
            return self.server.healthy()
        except Exception:  # noqa: BLE001 - an unreachable stage has lost its state
            return False


def stage_placer(servers, channel: TransferChannel):
    """The runner's `place_stages` hook: stage 0 here, stage s+1 behind servers[s]."""

    def place(runner, ranges, load_params, attention):
        devices = runner.spec.stage_devices(0)
        head = build_stage(runner.config, devices, 0, len(ranges), load_params,
                           dtype=runner.dtype, num_pages=runner.num_pages,
                           page_size=runner.page_size, attention=attention,
                           num_slots=runner.max_sampled_rows)
        remote = [RemoteStage(server, ranges[s], False, s == len(ranges) - 1, channel,
                              devices[0])
                  for s, server in enumerate(servers(runner), start=1)]
        return [head, *remote]
    return place
