"""Connection-level limits: header time-out, open-connection bound, one-line client-fault logs.

- Header time-out: aiohttp closes a connection whose keep-alive timer fires while it still
  waits for a complete request head, counted from the connection's start or its previous
  answer. That is exactly a header time-out, so `keepalive_timeout=header_timeout` gives one
  (idle keep-alive connections close after the same time, as uvicorn's 5 s default does).
- Body time-out: per request, where handlers read the body (request_fields.read_json_object);
  aiohttp's lingering read of a body left unread after the answer is bounded by it too.
- Open connections: the listener's protocol factory hands a connection past the bound a
  refusal (503, closed) instead of aiohttp's handler. Connections register one loop turn after
  their accept, so one accept burst may pass the bound by up to the listen backlog.
- aiohttp logs a traceback for each malformed request and each client that left early; those
  are the client's doing and a hostile client can make thousands, so they log one line each.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("serving")

DEFAULT_MAX_BODY_BYTES = 16 << 20
CLIENT_FAULTS = (HttpProcessingError, web.RequestPayloadError, ConnectionError)


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0   # seconds to send a request's head
    body_timeout: float = 30.0     # seconds to send its body
    max_connections: int = 1024    # connections open at once


class ClientFaultLog(logging.LoggerAdapter):
    """aiohttp's protocol logger, with client faults in one line (INFO) instead of a traceback."""

    def exception(self, msg, *args, exc_info=True, **kwargs):
        if isinstance(exc_info, CLIENT_FAULTS):
            detail = " ".join(str(exc_info).split())
            self.info(f"{msg}: %s: %s", *args, type(exc_info).__name__, detail)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


def runner_settings(limits: HttpLimits) -> dict:
    """Keyword arguments of web.AppRunner (passed on to aiohttp's RequestHandler)."""
    return {"keepalive_timeout": limits.header_timeout,
            "lingering_time": limits.body_timeout,
            "logger": ClientFaultLog(logging.getLogger("aiohttp.server"), {})}


class _Refusal(asyncio.Protocol):
    """Answers a connection past the bound with 503 and closes it."""

    def __init__(self, limit: int):
        body = json.dumps({"error": f"server has {limit} connections open, its "
                                    f"--max-connections: retry later"}).encode()
        self.answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                       b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.answer)
        transport.close()


class BoundedTCPSite(web.BaseSite):
    """A TCP listener serving at most `max_connections` connections at once."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int):
        super().__init__(runner)
        self._host, self._port, self._max_connections = host, port, max_connections

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server

        def protocol():
            if len(server.connections) < self._max_connections:
                return server()
            return _Refusal(self._max_connections)

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, backlog=self._backlog)
