"""KV pulls from a source that is frozen or dead (dsjax/executor/remote_kv.py, waited for by
kv_migration.await_arrival as a decode instance's pull waiters do): the pull fails within its
deadline, naming the source, instead of hanging its destination or handing it
arrays that would poison the pages they are written into. The source is a real process with
its own transfer server; the faults are SIGSTOP and SIGKILL."""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time

import jax
import numpy as np
import pytest

from dsjax.executor.kv_migration import KVPullFailed, ShardBox, arrays_of, await_arrival
from dsjax.executor.remote_kv import RemotePages, RemoteShard, TransferServerKVLink

SHAPE = (2, 64, 4, 4, 16)   # layers, pages, page size, heads, head dim: 128 KiB per array


def _offer(conn) -> None:
    """The source: offer one shard's K and V on a transfer server, say where, then wait."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    link = TransferServerKVLink("127.0.0.1")
    arrays = [jnp.full(SHAPE, float(i + 1), jnp.float32) for i in range(2)]
    link.server.await_pull(7, arrays)
    conn.send(link.address)
    time.sleep(600)


def _pull(payload, timeout_s):
    shards = TransferServerKVLink("127.0.0.1").pull(payload, jax.devices()[0])
    await_arrival(arrays_of(shards), timeout_s, payload.address)
    return shards


@pytest.fixture
def source():
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_offer, args=(theirs,), daemon=True)
    process.start()
    assert ours.poll(120), "the source process did not start its transfer server"
    payload = RemotePages(ours.recv(), 7, (RemoteShard(ShardBox(0, 2, 0, 4), SHAPE,
                                                       "float32"),))
    yield process, payload
    process.kill()
    process.join()


def test_pull_from_a_live_source_arrives(source):
    """The baseline the faults are measured against: the same pull, source alive."""
    _, payload = source
    [shard] = _pull(payload, 60.0)
    np.testing.assert_array_equal(np.asarray(shard.v), np.full(SHAPE, 2.0, np.float32))


def test_pull_from_a_frozen_source_fails_by_its_deadline(source):
    process, payload = source
    os.kill(process.pid, signal.SIGSTOP)
    while open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.01)    # the stop takes each of its threads in turn
    start = time.monotonic()
    with pytest.raises(KVPullFailed, match=f"from {payload.address} took over 2 s"):
        _pull(payload, 2.0)
    assert 2.0 <= time.monotonic() - start < 20.0


def test_pull_from_a_dead_source_fails_naming_it(source):
    process, payload = source
    process.kill()
    process.join()
    with pytest.raises(KVPullFailed, match=f"from {payload.address}"):
        _pull(payload, 2.0)


def test_pull_from_a_source_never_reached_fails_by_its_deadline():
    """A source cut off before the first pull from it: TCP would retry its connection for
    minutes. A listener whose accept queue is full drops every SYN, as a cut link does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    payload = RemotePages(address, 7, (RemoteShard(ShardBox(0, 2, 0, 4), SHAPE, "float32"),))
    start = time.monotonic()
    try:
        with pytest.raises(KVPullFailed, match=f"from {address} took over 2 s"):
            _pull(payload, 2.0)
        assert time.monotonic() - start < 20.0
    finally:
        for s in [*fillers, listener]:
            s.close()
