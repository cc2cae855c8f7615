"""Connection bounds and how long a connection is kept, over raw sockets (issue 18).

Connections that never sent a request head (half-open) give way to newcomers once a second old;
used ones (here: a body the server is still waiting for) are never displaced, and a newcomer
past a bound they fill gets 503, counted in /metrics. Waits are hang guards, except where a test
shows the server closes a connection well before the old behaviour would have.
"""
from __future__ import annotations

import asyncio

import pytest

from tests._raw_http import HANG_GUARD, body_of, exchange, request_bytes, status_of
from tests._server_helpers import parse_metrics

HEALTH = request_bytes(b"", path="/health", method="GET")
HALF_OPEN = b"POST /generate HTT"                           # a request head never finished
STALLED_BODY = request_bytes(b"{").replace(b"Content-Length: 1", b"Content-Length: 100")


def limits(**changes):
    from serving.connections import HttpLimits
    return HttpLimits(**{"header_timeout": HANG_GUARD, "body_timeout": HANG_GUARD, **changes})


async def hold(port: int, data: bytes, local: str = "127.0.0.1"):
    """A connection that sent `data` and waits; the server registered it once this returns."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(0.05)
    return reader, writer


async def closed_by_server(reader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 0.5) == b""
    except asyncio.TimeoutError:
        return False
    except ConnectionResetError:
        return True


def counts(loop, served) -> dict:
    raw = loop.run(exchange(served.port, request_bytes(b"", path="/metrics", method="GET")))
    samples = parse_metrics(raw.split(b"\r\n\r\n", 1)[1].decode())
    refused = {s[0]["reason"]: s[1] for s in samples["dsjax_admission_rejections_total"]}
    http = {s[0]["status"]: s[1] for s in samples.get("dsjax_http_errors_total", [])}
    return {"refused": refused, "503": http.get("503", 0),
            "unused_closed": samples["dsjax_unused_connections_closed_total"][0][1]}


def test_half_open_sockets_give_way_to_probes(loop):
    """One client holds every connection half-open (and would reopen them as they time out):
    once they are older than a second, each probe, from it or anyone, closes the oldest instead
    of being refused. Younger ones are not displaced (a client may be sending its request)."""
    from serving.connection_gate import EVICTABLE_AFTER_S
    served = loop.serve(limits=limits(max_connections=8, max_client_connections=8))

    async def scenario():
        held = [await hold(served.port, HALF_OPEN) for _ in range(8)]
        answers = [await exchange(served.port, HEALTH)]        # all young: refused
        await asyncio.sleep(EVICTABLE_AFTER_S)
        for _ in range(3):   # a probe, then the client fills the bound again
            answers.append(await exchange(served.port, HEALTH))
            held.append(await hold(served.port, HALF_OPEN))
        closed = [await closed_by_server(reader) for reader, _ in held[:4]]
        for _, writer in held:
            writer.close()
        return answers, closed

    answers, closed = loop.run(scenario(), timeout=3 * HANG_GUARD)
    assert [status_of(a) for a in answers] == [503, 200, 200, 200]
    assert closed == [True, True, True, False]     # the three oldest, in order
    seen = counts(loop, served)
    assert seen["unused_closed"] == 3 and seen["refused"]["max_connections"] == 0
    assert seen["refused"]["client_connections"] == 1


def test_used_connections_are_kept_and_a_newcomer_past_the_bound_gets_503(loop):
    served = loop.serve(limits=limits(max_connections=3, max_client_connections=10))

    async def scenario():
        busy = [await hold(served.port, STALLED_BODY) for _ in range(3)]
        refused = await exchange(served.port, HEALTH)
        still_open = [not await closed_by_server(reader) for reader, _ in busy]
        for _, writer in busy:
            writer.close()
        await asyncio.sleep(0.2)   # the server sees the closes
        return refused, still_open

    refused, still_open = loop.run(scenario(), timeout=3 * HANG_GUARD)
    assert status_of(refused) == 503 and b"Retry-After: 1" in refused
    assert "--max-connections" in body_of(refused)["error"]
    assert still_open == [True] * 3
    seen = counts(loop, served)
    assert seen["refused"]["max_connections"] == 1 and seen["503"] == 1
    assert seen["unused_closed"] == 0


def test_one_client_cannot_take_every_connection(loop):
    """Past --max-client-connections of busy connections a client is refused; another client
    (another loopback address) is served."""
    served = loop.serve(limits=limits(max_connections=16, max_client_connections=2))

    async def scenario():
        busy = [await hold(served.port, STALLED_BODY) for _ in range(2)]
        same = await exchange(served.port, HEALTH)
        reader, writer = await hold(served.port, HEALTH, local="127.0.0.2")
        other = await asyncio.wait_for(reader.read(), HANG_GUARD)
        writer.close()
        for _, w in busy:
            w.close()
        await asyncio.sleep(0.2)
        return same, other

    same, other = loop.run(scenario(), timeout=3 * HANG_GUARD)
    assert status_of(same) == 503 and "--max-client-connections" in body_of(same)["error"]
    assert status_of(other) == 200
    assert counts(loop, served)["refused"]["client_connections"] == 1


async def answer_then_eof(port: int, data: bytes, give_up: float) -> tuple[bytes, bool]:
    """Send `data` and keep the socket open without sending more: (the answer, whether the
    server closed the connection within `give_up` seconds after answering)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD)
    length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    answer = head + await reader.readexactly(length)
    try:
        closed = await asyncio.wait_for(reader.read(), give_up) == b""
    except asyncio.TimeoutError:
        closed = False
    writer.close()
    return answer, closed


@pytest.mark.parametrize("case", ["413: Content-Length over the limit", "408: body stalled"])
def test_a_refused_body_does_not_hold_its_connection(loop, case):
    """After a 413 the server reads what is left for at most 2 s (it held the socket for the
    whole 30 s body time-out before); after a 408 it closes at once (it waited the body
    time-out again)."""
    if case.startswith("413"):
        served = loop.serve(limits=limits(body_timeout=HANG_GUARD), max_body_bytes=1 << 20)
        data = request_bytes(b"{").replace(b"Content-Length: 1", b"Content-Length: 1000000000")
        give_up, status = 10.0, 413
    else:
        served = loop.serve(limits=limits(body_timeout=3.0))
        data, give_up, status = STALLED_BODY, 1.5, 408
    answer, closed = loop.run(answer_then_eof(served.port, data, give_up),
                              timeout=3 * HANG_GUARD)
    assert status_of(answer) == status and closed
