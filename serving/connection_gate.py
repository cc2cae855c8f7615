"""Who may hold a connection: a bound on all open connections and one per client address.

A connection past a bound first makes room by closing the oldest connection in that scope (the
client's own, or any) that has sent no whole request head in its first EVICTABLE_AFTER_S:
half-open, or stalled in its head. Otherwise the newcomer is refused: 503 with Retry-After,
counted in /metrics by reason. So a client holding hundreds of half-open sockets cannot lock
anyone out (each newcomer displaces one of them), and one client can hold at most
--max-client-connections of the --max-connections. Connections that served a request are not
displaced even while idle: a client may be writing its next request on one, and would see it
reset (idle ones close after --header-timeout).

Each accepted connection's protocol is a _Gate in front of aiohttp's handler: it decides in
connection_made (where the peer address is known), then passes every event on. The decision
and the counts happen in the same loop turn, so an accept burst cannot overshoot the bounds.
"""
from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Callable

from aiohttp import web

MAX_CONNECTIONS, CLIENT_CONNECTIONS = "max_connections", "client_connections"
CONNECTION_REASONS = (MAX_CONNECTIONS, CLIENT_CONNECTIONS)
REFUSAL_LINGER_S = 1.0   # a refused client's request is read (and dropped) this long
EVICTABLE_AFTER_S = 1.0  # a connection with no request yet may be displaced after this long


class Connection:
    __slots__ = ("client", "transport", "opened", "used", "open")

    def __init__(self, client: str, transport: asyncio.Transport, opened: float):
        self.client, self.transport, self.opened = client, transport, opened
        self.used = False     # a request on it reached the app (its middleware says)
        self.open = True


class ConnectionRegistry:
    """Open connections (by transport), per client in the order they opened; decides who gets
    one."""

    def __init__(self, max_connections: int, max_client_connections: int,
                 on_refuse: Callable[[str], None], on_evict: Callable[[], None]):
        self.max_connections = max_connections
        self.max_client_connections = max_client_connections
        self.on_refuse, self.on_evict = on_refuse, on_evict
        self.all: OrderedDict[asyncio.BaseTransport, Connection] = OrderedDict()
        self.by_client: dict[str, OrderedDict[asyncio.BaseTransport, Connection]] = {}

    def __len__(self) -> int:
        return len(self.all)

    def connection_of(self, transport) -> Connection | None:
        return self.all.get(transport)

    def admit(self, client: str, transport: asyncio.Transport) -> Connection | str:
        """A Connection for `client`, or the reason it is refused (after trying to make room
        by closing a connection that sent no request in the scope that is full)."""
        mine = self.by_client.get(client, {})
        if len(mine) >= self.max_client_connections and not self._evict_unused(mine):
            self.on_refuse(CLIENT_CONNECTIONS)
            return CLIENT_CONNECTIONS
        if len(self.all) >= self.max_connections and not self._evict_unused(self.all):
            self.on_refuse(MAX_CONNECTIONS)
            return MAX_CONNECTIONS
        conn = Connection(client, transport, asyncio.get_running_loop().time())
        self.all[transport] = conn
        self.by_client.setdefault(client, OrderedDict())[transport] = conn
        return conn

    def _evict_unused(self, scope: dict) -> bool:
        """Close the oldest connection of `scope` still without a request after
        EVICTABLE_AFTER_S; False when there is none."""
        deadline = asyncio.get_running_loop().time() - EVICTABLE_AFTER_S
        for conn in scope.values():
            if conn.opened > deadline:
                return False      # in opening order: the rest are younger still
            if not conn.used:
                self.closed(conn)
                conn.transport.close()
                self.on_evict()
                return True
        return False

    def closed(self, conn: Connection) -> None:
        if not conn.open:
            return
        conn.open = False
        self.all.pop(conn.transport, None)
        mine = self.by_client.get(conn.client)
        if mine is not None:
            mine.pop(conn.transport, None)
            if not mine:
                del self.by_client[conn.client]


def refusal_answer(reason: str, registry: ConnectionRegistry) -> bytes:
    if reason == CLIENT_CONNECTIONS:
        what = (f"your address has {registry.max_client_connections} connections open, the "
                f"server's --max-client-connections: finish or close some, then retry")
    else:
        what = (f"server has {registry.max_connections} connections open, its "
                f"--max-connections: retry later")
    body = json.dumps({"error": what}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


class _Gate(asyncio.Protocol):
    """One accepted connection: aiohttp's handler behind it, or a refusal."""

    def __init__(self, registry: ConnectionRegistry, make_handler):
        self.registry, self.make_handler = registry, make_handler
        self.handler = None
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        verdict = self.registry.admit(client, transport)
        if isinstance(verdict, str):
            # Answer, send FIN, and read what the client sent for a moment: closing with its
            # request unread would reset the connection and could lose the answer.
            transport.write(refusal_answer(verdict, self.registry))
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)
            return
        self.conn = verdict
        self.handler = self.make_handler()
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)

    def eof_received(self):
        if self.handler is not None:
            return self.handler.eof_received()
        return None   # a refused connection: the transport closes

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.handler is not None:
            self.registry.closed(self.conn)
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()


def used_middleware(registry: ConnectionRegistry):
    """Marks a connection used once a request on it reaches the app: it is not displaced."""
    @web.middleware
    async def used(request: web.Request, handler):
        conn = registry.connection_of(request.transport)
        if conn is not None:
            conn.used = True
        return await handler(request)
    return used


class GatedTCPSite(web.BaseSite):
    """A TCP listener whose connections pass a ConnectionRegistry."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 registry: ConnectionRegistry, make_handler):
        super().__init__(runner)
        self._host, self._port = host, port
        self.registry, self.make_handler = registry, make_handler

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self.registry, self.make_handler), self._host, self._port,
            backlog=self._backlog)
