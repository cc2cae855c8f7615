"""KV between instances in separate processes (or hosts), over JAX's transfer servers.

The source offers each exported shard on its transfer server (`await_pull` under a fresh id) and
sends only a description (address, id, each shard's box, shape and dtype) in its message; the
destination pulls the shards straight onto its own devices and reshards them locally like
`LocalKVLink`. The pages never pass through pickled host arrays or the message channel.

A transfer server binds `[::]` by default: we bind the interface the engine is configured with
(loopback unless told otherwise), so the KV is never offered to the whole network.

A pull is waited for, with a deadline, before its shards touch the destination's pages: a
source that died or was cut off then fails the one request whose KV it held (its error names
the source), instead of hanging the destination or poisoning the page pool it writes into
(which would lose every request of the destination).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time

import jax
from jax.sharding import SingleDeviceSharding

from dsjax.executor.kv_migration import PageShard, ShardBox, export_shards, reshard_pages, \
    shards_nbytes

# A pull may take PULL_TIMEOUT_S plus its bytes at PULL_MIN_BYTES_PER_S: slower, its source is
# taken for lost (a 1 GB pull gets 20 s).
PULL_TIMEOUT_S = 10.0
PULL_MIN_BYTES_PER_S = 100e6


class KVPullFailed(RuntimeError):
    """A request's KV could not be pulled from its source (dead, cut off, or too slow)."""


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


class TransferServerKVLink:
    """One per instance process: a transfer server for exports, connections for imports."""

    def __init__(self, host: str = "127.0.0.1"):
        from jax.experimental import transfer
        client = jax.local_devices()[0].client
        self.server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
        self.address = self.server.address()
        self._connections = {}
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
        """The shards of `payload` on `device`, arrived (KVPullFailed if they cannot be)."""
        conn = self._connections.get(payload.address)
        if conn is None:
            conn = self._connections[payload.address] = self.server.connect(payload.address)
        sharding = SingleDeviceSharding(device)
        specs = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
                 for s in payload.shards for _ in (0, 1)]
        arrays = conn.pull(payload.transfer_id, specs)   # both are lazy: the wait is below
        try:
            _await_pull(arrays, payload.address)
        except KVPullFailed as e:   # without the frames that hold the arrays still pending
            raise e.with_traceback(None) from e.__cause__
        return [PageShard(s.box, arrays[2 * i], arrays[2 * i + 1])
                for i, s in enumerate(payload.shards)]

    def import_pages(self, runner, payload: RemotePages, dst_blocks) -> int:
        # Land every shard on the destination's first device; the local reshard then moves
        # each piece to the device that holds its heads.
        shards = self.pull(payload, runner.stages[0].mesh.devices.flat[0])
        runner.insert_pages(dst_blocks, reshard_pages(shards, runner))
        return shards_nbytes(shards, len(dst_blocks))

    def discard(self, payload: RemotePages) -> None:
        """Pull and drop an export nobody needs, so the source's server lets go of it now."""
        try:
            self.pull(payload, jax.local_devices()[0])
        except KVPullFailed:   # its source is gone: nothing to let go of
            pass

    def close(self) -> None:
        self._connections.clear()


def _await_pull(arrays, address: str) -> None:
    """Wait until the pulled arrays have arrived (or their pull failed) within the deadline."""
    nbytes = sum(a.nbytes for a in arrays)
    timeout = PULL_TIMEOUT_S + nbytes / PULL_MIN_BYTES_PER_S
    deadline, pause = time.monotonic() + timeout, 1e-4
    while not all(a.is_ready() for a in arrays):
        if time.monotonic() > deadline:
            raise KVPullFailed(f"pulling {nbytes / 1e6:.1f} MB of KV from {address} took over "
                               f"{timeout:.0f} s: its source is dead or cut off")
        time.sleep(pause)
        pause = min(2 * pause, 2e-3)
    try:
        jax.block_until_ready(arrays)
    except Exception as e:  # noqa: BLE001 - the transport's error, as the request's
        raise KVPullFailed(f"pulling KV from {address} failed: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e

