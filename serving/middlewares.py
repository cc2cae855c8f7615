"""Request-level guards, outermost first: error answers, Host check, API key, JSON POST bodies.

The Host and Content-Type checks keep web pages from driving a local server: DNS rebinding
gives a page's requests a foreign Host header, and a cross-origin POST a browser sends without
asking the server first (a "simple" request) carries text/plain, a form type, or no type at all.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import re

from aiohttp import web

from serving.api_errors import ApiError, error_body
from serving.metrics import ServerMetrics

log = logging.getLogger("serving")

UNGUARDED_PATHS = {"/health"}   # probes reach it by any name, without a key
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ROUTES_TEXT = ("/generate, /v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
               "/detokenize, /health, /metrics")


def error_middleware(metrics: ServerMetrics):
    @web.middleware
    async def errors(request: web.Request, handler):
        """Every failure becomes a JSON answer naming the problem; the server serves on."""
        param = None
        try:
            response = await handler(request)
        except ApiError as e:
            status, message, headers, param = e.status, e.message, e.headers, e.param
        except web.HTTPException as e:
            if e.status < 400:
                raise
            status, headers = e.status, {}
            message = f"{e.reason}: {request.method} {request.path}"
            if e.status == 404:
                message += f" does not exist (routes: {ROUTES_TEXT})"
            elif e.status == 405:
                message += f" is not allowed (allowed: {e.headers.get('Allow', '?')})"
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:  # a bug: answer 500 and log it, do not take the server down
            log.exception("error while handling %s %s", request.method, request.path)
            status, headers = 500, {}
            message = f"internal server error: {type(e).__name__}: {e}"
        else:
            if response.status >= 400:
                metrics.observe_http_error(response.status)
            return response
        metrics.observe_http_error(status)
        response = web.json_response(error_body(request.path, status, message, param),
                                     status=status, headers=headers)
        if status == 408:   # the client stalled sending its body: answer and close, no linger
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response
    return errors


# RFC 9110's Host: a bracketed IPv6 literal or a name of letters, digits, '.', '-', '_', '~',
# then an optional port. Anything else ('localhost:80@evil.example') is not a Host at all.
HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]{0,5})?")


def host_name(header: str) -> str | None:
    """'Example.COM.:8400' -> 'example.com', '[::1]:8400' -> '::1'; None when malformed."""
    match = HOST_HEADER.fullmatch(header)
    return configured_host(match.group(1)) if match else None


def configured_host(name: str) -> str:
    """A host name as --allowed-hosts or --host spell it: '[::1]' -> '::1', 'Example.com.' ->
    'example.com'."""
    return name.strip("[]").rstrip(".").lower()


def host_middleware(allowed_hosts: set[str]):
    """Serve only requests whose Host is allowed ('*': any). The set may grow until the server
    starts (the launcher adds the address it binds)."""
    @web.middleware
    async def hosts(request: web.Request, handler):
        header = request.headers.get("Host")
        if header is None or request.path in UNGUARDED_PATHS:
            return await handler(request)
        name = host_name(header)
        if name is None:
            raise ApiError(400, f"Host {header!r} is malformed: send a host name or address, "
                                f"optionally with ':port'", param="Host")
        if "*" not in allowed_hosts and name not in allowed_hosts:
            raise ApiError(400, f"Host {header!r} is not served here (allowed: "
                                f"{', '.join(sorted(allowed_hosts))}): start the server with "
                                f"--allowed-hosts naming it, or '*'", param="Host")
        return await handler(request)
    return hosts


def is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


@web.middleware
async def json_post_middleware(request: web.Request, handler):
    """POST bodies must say they are JSON: 415 otherwise (a missing type included)."""
    if request.method == "POST" and ("Content-Type" not in request.headers or
                                     not is_json_type(request.content_type)):
        given = request.headers.get("Content-Type", "none")
        raise ApiError(415, f"Content-Type {given!r} is not accepted: send the JSON body with "
                            f"'Content-Type: application/json' (curl: -H 'Content-Type: "
                            f"application/json')", param="Content-Type")
    return await handler(request)


def bearer_matches(header: str, key: str) -> bool:
    # aiohttp decodes header bytes that are not UTF-8 as surrogate escapes; encode them back.
    try:
        given = header.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given, f"Bearer {key}".encode())


def auth_middleware(api_key: str | None):
    @web.middleware
    async def auth(request: web.Request, handler):
        if api_key and request.path not in UNGUARDED_PATHS and \
                not bearer_matches(request.headers.get("Authorization", ""), api_key):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: "
                                "Bearer <key>' with the server's --api-key",
                           {"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return auth
