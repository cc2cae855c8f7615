"""The aiohttp application: routes, guards, and starting and stopping the listener.

Routes (docs/api.md, docs/serving.md): POST /generate (generate_api.py), POST /v1/completions,
GET /v1/models[/{id}] (openai_api.py), POST /v1/chat/completions (chat_api.py), GET /health,
GET /metrics. Importing this module does not import JAX, so `python -m serving.api_server` can
still choose the CPU device count first.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Sequence

from aiohttp import web

from serving import chat_api, generate_api, openai_api, tokenize_api
from serving.admission import DEFAULT_MAX_QUEUE, DEFAULT_TPOT_SLO, SLO_MULTIPLE
from serving.connection_gate import ConnectionRegistry, GatedTCPSite, used_middleware
from serving.connections import (DEFAULT_MAX_BODY_BYTES, HttpLimits, handler_factory,
                                 runner_settings)
from serving.context import build_context
from serving.engine_client import EngineClient
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import ServerMetrics
from serving.middlewares import (LOCAL_HOSTS, auth_middleware, configured_host, error_middleware,
                                 host_middleware, json_post_middleware)

log = logging.getLogger("serving")

CLIENT = web.AppKey("client", EngineClient)
LIMITS = web.AppKey("limits", HttpLimits)
CONNECTIONS = web.AppKey("connections", ConnectionRegistry)
ALLOWED_HOSTS = web.AppKey("allowed_hosts", set)
DEFAULT_HOSTS = web.AppKey("default_hosts", bool)


def health_handler(client: EngineClient):
    async def health(request: web.Request) -> web.Response:
        if not client.admission.accepting:
            return web.json_response({"status": "shutting down"}, status=503)
        state = client.engine.health()
        failed = "; ".join(f"{name}: {s}" for name, s in state["instances"].items() if s != "ok")
        if not state["ok"]:
            return web.json_response({"status": f"engine failed: {failed}", **state},
                                     status=503)
        # Some instance failed but every phase still has one: serving, and saying so.
        status = f"degraded: {failed}" if failed else "ok"
        return web.json_response({"status": status, **state})
    return health


def metrics_handler(metrics: ServerMetrics):
    async def render(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
    return render


def create_app(engine, *, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_queue_delay: float | None = None, max_tpot: float | None = None,
               limits: HttpLimits = HttpLimits(), allowed_hosts: Iterable[str] | None = None,
               served_model_names: Sequence[str] | None = None,
               chat_template: str | None = None) -> web.Application:
    """The server of `engine`. allowed_hosts None: localhost names and, once start_server binds
    it, the bound address. chat_template: --chat-template (else the tokenizer directory's).
    max_queue_delay, max_tpot: the TTFT and TPOT an admitted request may take (default: the
    stated multiple of the engine's TTFT SLO and of the default TPOT SLO)."""
    if max_queue_delay is None:
        max_queue_delay = SLO_MULTIPLE * engine.config.ttft_slo
    if max_tpot is None:
        max_tpot = SLO_MULTIPLE * DEFAULT_TPOT_SLO
    ctx = build_context(engine, max_queue=max_queue, max_queue_delay=max_queue_delay,
                        max_tpot=max_tpot,
                        served_model_names=served_model_names, chat_template=chat_template,
                        body_timeout=limits.body_timeout)
    client, metrics = ctx.client, ctx.client.metrics
    hosts = {configured_host(h) for h in allowed_hosts or LOCAL_HOSTS}
    connections = ConnectionRegistry(limits.max_connections, limits.max_client_connections,
                                     metrics.observe_connection_refusal,
                                     metrics.observe_unused_connection_closed)
    metrics.watch_connections(lambda: len(connections))
    app = web.Application(client_max_size=max_body_bytes, middlewares=[
        used_middleware(connections), error_middleware(metrics), host_middleware(hosts),
        auth_middleware(api_key), json_post_middleware])
    app[CLIENT], app[LIMITS], app[CONNECTIONS] = client, limits, connections
    app[ALLOWED_HOSTS], app[DEFAULT_HOSTS] = hosts, allowed_hosts is None
    app.router.add_post("/generate", generate_api.generate_handler(ctx))
    app.router.add_post("/v1/completions", openai_api.completions_handler(ctx))
    app.router.add_post("/v1/chat/completions", chat_api.chat_handler(ctx))
    app.router.add_post("/tokenize", tokenize_api.tokenize_handler(ctx))
    app.router.add_post("/detokenize", tokenize_api.detokenize_handler(ctx))
    app.router.add_get("/v1/models", openai_api.models_handler(ctx))
    app.router.add_get("/v1/models/{model:.+}", openai_api.model_handler(ctx))
    app.router.add_get("/health", health_handler(client))
    app.router.add_get("/metrics", metrics_handler(metrics))
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); returns the runner and the bound port."""
    if app[DEFAULT_HOSTS]:
        app[ALLOWED_HOSTS].add(configured_host(host))
        if host in ("0.0.0.0", "::", ""):
            log.warning("listening on all interfaces, but serving only the Host names %s: "
                        "give the names clients use with --allowed-hosts (or '*')",
                        sorted(app[ALLOWED_HOSTS]))
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the engine even while a non-streaming request is still waiting for tokens.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0,
                           **runner_settings(app[LIMITS]))
    await runner.setup()
    site = GatedTCPSite(runner, host, port, app[CONNECTIONS],
                        handler_factory(runner.server, app[CLIENT].metrics.observe_http_error))
    await site.start()
    return runner, runner.addresses[0][1]


async def stop_server(app: web.Application, runner: web.AppRunner) -> None:
    """Refuse new requests, abort the ones in flight (freeing their blocks), close the port."""
    client = app[CLIENT]
    client.admission.accepting = False
    client.abort_all()
    await asyncio.sleep(0.05)  # let the handlers write their final records
    await runner.cleanup()


if __name__ == "__main__":  # docs/api.md names this module; the launcher is the same program
    import sys

    from serving.__main__ import main
    sys.exit(main())
