"""KV between instances in separate processes (or hosts), over JAX's transfer servers.

The source offers each exported shard on its transfer server (`await_pull` under a fresh id) and
sends only a description (address, id, each shard's box, shape and dtype) in its message; the
destination pulls the shards straight onto its own devices and reshards them locally like
`LocalKVLink`. The pages never pass through pickled host arrays or the message channel.

A transfer server binds `[::]` by default: we bind the interface the engine is configured with
(loopback unless told otherwise), so the KV is never offered to the whole network.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import threading

import jax
from jax.sharding import SingleDeviceSharding

from dsjax.executor.kv_migration import LocalKVLink, PageShard, ShardBox, export_shards


@dataclasses.dataclass(frozen=True)
class RemoteShard:
    box: ShardBox
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class RemotePages:
    """What a KVReady message carries between processes: where and what to pull."""
    address: str
    transfer_id: int
    shards: tuple[RemoteShard, ...]


class TransferServerKVLink(LocalKVLink):
    """One per instance process: a transfer server for exports, connections for imports
    (receive pulls the shards; they land asynchronously)."""

    def __init__(self, host: str = "127.0.0.1"):
        from jax.experimental import transfer
        client = jax.local_devices()[0].client
        self.server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
        self.address = self.server.address()
        self._connections = {}
        self._lock = threading.Lock()
        # Ids must be unique per server across the process's life; mix in the pid so a
        # restarted instance never reuses a live id on a long-lived peer.
        self._ids = itertools.count((os.getpid() & 0xFFFF) << 40)

    def export(self, runner, block_ids) -> RemotePages:
        shards = export_shards(runner, block_ids)
        transfer_id = next(self._ids)
        arrays = [a for s in shards for a in (s.k, s.v)]
        self.server.await_pull(transfer_id, arrays)
        return RemotePages(self.address, transfer_id, tuple(
            RemoteShard(s.box, tuple(s.k.shape), str(s.k.dtype)) for s in shards))

    def pull(self, payload: RemotePages, device) -> list[PageShard]:
        """Start pulling `payload`'s shards onto `device`: arrays that may still be arriving."""
        # Pulls start from waiter threads; a connect to a stalled source may block, so it runs
        # outside the lock (two racing connects to one address are harmless).
        with self._lock:
            conn = self._connections.get(payload.address)
        if conn is None:
            conn = self.server.connect(payload.address)
            with self._lock:
                conn = self._connections.setdefault(payload.address, conn)
        sharding = SingleDeviceSharding(device)
        specs = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
                 for s in payload.shards for _ in (0, 1)]
        arrays = conn.pull(payload.transfer_id, specs)
        return [PageShard(s.box, arrays[2 * i], arrays[2 * i + 1])
                for i, s in enumerate(payload.shards)]

    def receive(self, runner, payload: RemotePages) -> list[PageShard]:
        # Land every shard on the destination's first device; the local reshard then moves
        # each piece to the device that holds its heads.
        return self.pull(payload, runner.stages[0].mesh.devices.flat[0])

    def discard(self, payload: RemotePages) -> None:
        """Pull and drop an export nobody needs, so the source's server lets go of it (without
        waiting: a stalled source must not stall this instance)."""
        self.pull(payload, jax.local_devices()[0])

    def close(self) -> None:
        self._connections.clear()
