"""Connection-level settings of aiohttp's handler: time-outs, lingering, logs, error answers.

- Header time-out: aiohttp closes a connection whose keep-alive timer fires while it still
  waits for a complete request head, counted from the connection's start or its previous
  answer. That is exactly a header time-out, so `keepalive_timeout=header_timeout` gives one
  (idle keep-alive connections close after the same time, as uvicorn's 5 s default does).
- Body time-out: per request, where handlers read the body (request_fields.read_json_object).
  A 408 closes the connection at once (the client stalled; nothing more will come).
- Lingering: after an answer given without reading the whole body (413, 401, 415...), aiohttp
  reads and drops the rest so the client sees the answer rather than a reset; at most
  LINGER_S, then the connection closes.
- What aiohttp's HTTP parser refuses (and any error outside the app) is answered in JSON and
  counted in /metrics, as the app's own errors are (JsonErrorHandler).
- aiohttp logs a traceback for each malformed request and each client that left early; those
  are the client's doing and a hostile client can make thousands, so they log one line each.
- Who may open a connection at all: connection_gate.py.
"""
from __future__ import annotations

import dataclasses
import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from serving.api_errors import error_body

log = logging.getLogger("serving")

DEFAULT_MAX_BODY_BYTES = 16 << 20
LINGER_S = 2.0   # the most a connection is kept after an answer to read a body left unread
CLIENT_FAULTS = (HttpProcessingError, web.RequestPayloadError, ConnectionError)


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0   # seconds to send a request's head
    body_timeout: float = 30.0     # seconds to send its body
    max_connections: int = 1024    # connections open at once
    max_client_connections: int = 256   # connections open at once from one client address


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
            "lingering_time": min(limits.body_timeout, LINGER_S),
            "auto_decompress": False,   # bodies are decoded strictly (content_encoding.py)
            "logger": ClientFaultLog(logging.getLogger("aiohttp.server"), {})}


class JsonErrorHandler(RequestHandler):
    """aiohttp's handler, but what its HTTP parser refuses (bad framing, a header too long) and
    errors outside the app are answered in JSON, as every other error, and counted."""

    __slots__ = ("on_error",)

    def handle_error(self, request, status=500, exc=None, message=None):
        super().handle_error(request, status, exc, message)   # logs; raises if answer began
        if status >= 500:
            text = "internal server error outside the request's handler: see the server's log"
        else:
            detail = " ".join(str(message or exc or "").split())
            text = (f"malformed HTTP request ({detail}): send a well-formed HTTP/1.1 request"
                    if detail else "malformed HTTP request: send a well-formed HTTP/1.1 request")
        self.on_error(status)
        response = web.json_response(error_body(request.path, status, text), status=status)
        response.force_close()
        return response


def handler_factory(server: web.Server, on_error):
    """Makes one JsonErrorHandler per connection, with the settings aiohttp's server holds."""
    def make() -> JsonErrorHandler:
        handler = JsonErrorHandler(server, loop=server._loop, **server._kwargs)
        handler.on_error = on_error
        return handler
    return make
