"""The aiohttp application: routes, auth, error answers, and DistServe's POST /generate.

Routes (docs/api.md, docs/serving.md): POST /generate, POST /v1/completions, GET /v1/models,
GET /health, GET /metrics. Importing this module does not import JAX, so
`python -m serving.api_server` can still choose the CPU device count first.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from aiohttp import web

from dsjax.engine.request import RequestOutput
from serving import openai_api
from serving.engine_client import ActiveRequest, ApiError, EngineClient
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import ServerMetrics
from serving.request_fields import (SAMPLING_FIELD_NAMES, check_kind, check_prompt,
                                    read_json_object, reject_unknown_fields, sampling_params_from)

log = logging.getLogger("serving")

ENGINE = web.AppKey("engine", object)
CLIENT = web.AppKey("client", EngineClient)
METRICS = web.AppKey("metrics", ServerMetrics)
API_KEY = web.AppKey("api_key", object)
MODEL_NAMES = web.AppKey("model_names", list)
STARTED = web.AppKey("started", int)

GENERATE_FIELDS = {"prompt", "stream"} | SAMPLING_FIELD_NAMES
UNAUTHENTICATED_PATHS = {"/health"}


# ---- middlewares --------------------------------------------------------------------------

def error_body(path: str, status: int, message: str, error_type: str) -> dict:
    """OpenAI's error object under /v1/, DistServe-style {"error": message} elsewhere."""
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return {"error": message}


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure becomes a JSON answer naming the problem; the server serves on."""
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except ApiError as e:
        status, message, headers, kind = e.status, e.message, e.headers, e.error_type
    except web.HTTPException as e:
        if e.status < 400:
            raise
        status, headers, kind = e.status, {}, "invalid_request_error"
        message = f"{e.reason}: {request.method} {request.path}"
        if e.status == 404:
            message += " does not exist (routes: /generate, /v1/completions, /v1/models, " \
                       "/health, /metrics)"
        elif e.status == 405:
            message += f" is not allowed (allowed: {e.headers.get('Allow', '?')})"
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # a bug: answer 500 and log it, do not take the server down
        log.exception("error while handling %s %s", request.method, request.path)
        status, headers, kind = 500, {}, "internal_error"
        message = f"internal server error: {type(e).__name__}: {e}"
    else:
        if response.status >= 400:
            metrics.observe_http_error(response.status)
        return response
    metrics.observe_http_error(status)
    return web.json_response(error_body(request.path, status, message, kind), status=status,
                             headers=headers)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    key = request.app[API_KEY]
    if key and request.path not in UNAUTHENTICATED_PATHS:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header "
                                "'Authorization: Bearer <key>' with the server's --api-key",
                           {"WWW-Authenticate": "Bearer"}, "authentication_error")
    return await handler(request)


# ---- small routes -------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    client, engine = request.app[CLIENT], request.app[ENGINE]
    if not client.accepting:
        return web.json_response({"status": "shutting down"}, status=503)
    if getattr(engine, "error", None) is not None:
        return web.json_response({"status": f"engine failed: {engine.error}"}, status=503)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": request.app[MODEL_NAMES][0], "object": "model", "owned_by": "dsjax",
         "created": request.app[STARTED]}]})


async def metrics(request: web.Request) -> web.Response:
    text = request.app[METRICS].render(request.app[ENGINE], request.app[CLIENT].num_active)
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


# ---- POST /generate -----------------------------------------------------------------------

def _logprobs_at(output: RequestOutput, index: int) -> dict[str, float] | None:
    if output.logprobs is None or index >= len(output.logprobs):
        return None
    return {str(t): lp for t, lp in output.logprobs[index].items()}


def generate_answer(output: RequestOutput) -> dict:
    answer = {"text": output.text or "", "token_ids": output.token_ids,
              "timestamps": output.token_timestamps, "lifetime_events": output.lifetime_events,
              "finish_reason": output.finish_reason}
    if output.logprobs is not None:
        answer["logprobs"] = [_logprobs_at(output, i) for i in range(len(output.token_ids))]
    return answer


def generate_stream_records(output: RequestOutput) -> list[dict]:
    """One record per new token; the text the output adds rides on its last token."""
    new = output.new_token_ids
    first = len(output.token_ids) - len(new)
    records = []
    for i, token_id in enumerate(new):
        last = i == len(new) - 1
        record = {"text": (output.new_text or "") if last else "", "token_id": token_id,
                  "timestamp": output.token_timestamps[first + i],
                  "finished": output.finished and last}
        if output.logprobs is not None:
            record["logprobs"] = _logprobs_at(output, first + i)
        if record["finished"]:
            record["finish_reason"] = output.finish_reason
            record["lifetime_events"] = output.lifetime_events
        records.append(record)
    return records


ABORTED_MESSAGE = "request aborted: the server is shutting down"


async def _stream_generate(request: web.Request, active: ActiveRequest) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        async for output in active.outputs():
            records = generate_stream_records(output)
            if output.finished and output.finish_reason == "abort":
                records.append({"error": ABORTED_MESSAGE})
            if records:
                await response.write("".join(json.dumps(r) + "\n" for r in records).encode())
    except RuntimeError as e:  # the engine failed after the stream began
        await response.write((json.dumps({"error": str(e)}) + "\n").encode())
    except ConnectionResetError:  # the client left; leaving the `with` aborts the request
        return response
    await response.write_eof()
    return response


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    reject_unknown_fields(body, GENERATE_FIELDS)
    if "prompt" not in body:
        raise ApiError(400, "field 'prompt' is required: text or a list of token ids")
    prompt = check_prompt(body["prompt"])
    check_kind("stream", body.get("stream"), "bool")
    params = sampling_params_from(body)
    with request.app[CLIENT].submit(prompt, params, id_prefix="gen") as active:
        if body.get("stream"):
            return await _stream_generate(request, active)
        try:
            final = await active.result()
        except RuntimeError as e:
            raise ApiError(500, str(e), error_type="internal_error") from e
        if final.finish_reason == "abort":
            raise ApiError(503, ABORTED_MESSAGE, error_type="unavailable")
        return web.json_response(generate_answer(final))


# ---- the application ----------------------------------------------------------------------

def served_model_names(engine) -> list[str]:
    """The name clients see first (the --model given), then the model's own size name."""
    names = [str(engine.config.model)]
    own = getattr(engine.model_config, "name", None)
    if own and own not in names and own != "opt":
        names.append(own)
    return names


def create_app(engine, *, api_key: str | None = None, max_queue: int = 8192,
               max_body_bytes: int = 16 << 20) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=max_body_bytes)
    app[ENGINE] = engine
    app[METRICS] = ServerMetrics()
    app[CLIENT] = EngineClient(engine, max_queue, app[METRICS])
    app[API_KEY] = api_key
    app[MODEL_NAMES] = served_model_names(engine)
    app[STARTED] = int(time.time())
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", openai_api.completions_handler(
        app[CLIENT], app[MODEL_NAMES], getattr(engine, "tokenizer", None)))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); returns the runner and the bound port."""
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the engine even while a non-streaming request is still waiting for tokens.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


async def stop_server(app: web.Application, runner: web.AppRunner) -> None:
    """Refuse new requests, abort the ones in flight (freeing their blocks), close the port."""
    client = app[CLIENT]
    client.accepting = False
    client.abort_all()
    await asyncio.sleep(0.05)  # let the handlers write their final records
    await runner.cleanup()


if __name__ == "__main__":  # docs/api.md names this module; the launcher is the same program
    import sys

    from serving.__main__ import main
    sys.exit(main())
