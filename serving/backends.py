"""One request function per server API; each streams a completion and times every token at the client.

A request function returns a RequestResult, or a FailedRequest on an HTTP error, a lost connection
or an error object in the stream, so one bad request never stops a benchmark.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import aiohttp

from dsjax.eval.workloads import TestRequest
from dsjax.eval.results import FailedRequest, RequestResult

DEFAULT_PORTS = {"distserve": 8400, "openai": 8100}   # the artifact's DistServe / vLLM ports


@dataclass(frozen=True)
class BackendOptions:
    model: str | None = None       # openai: the served model name
    api_key: str | None = None     # openai: sent as a bearer token


def sampling_payload(req: TestRequest) -> dict:
    """The artifact's sampling settings: one sample, plain sampling, exactly output_len tokens."""
    return {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": req.output_len,
            "ignore_eos": True, "stream": True}


class StreamError(Exception):
    """The server reported an error inside a 200 response's stream."""


async def _split_stream(response: aiohttp.ClientResponse,
                        separators: bytes) -> AsyncIterator[tuple[bytes, float]]:
    """Yield (record, arrival time) for every non-empty record between any of `separators`.

    Records that arrive in one network read share its arrival time: that is what the client saw.
    """
    buffer = b""
    async for chunk in response.content.iter_any():
        now = time.perf_counter()
        buffer += chunk
        for sep in separators:
            buffer = buffer.replace(bytes([sep]), b"\n")
        *records, buffer = buffer.split(b"\n")
        for record in records:
            if record.strip():
                yield record, now
    if buffer.strip():
        yield buffer, time.perf_counter()


async def _post_and_time(session: aiohttp.ClientSession, url: str, payload: dict, req: TestRequest,
                         headers: dict[str, str],
                         parse: Callable[[aiohttp.ClientResponse], AsyncIterator[tuple[dict, float]]],
                         lifecycle_key: str | None) -> RequestResult | FailedRequest:
    start = time.perf_counter()
    stamps: list[float] = []
    last: dict = {}
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                body = (await response.text())[:300]
                return FailedRequest(req.prompt_len, req.output_len, start,
                                     f"HTTP {response.status}: {body}")
            async for obj, arrived in parse(response):
                stamps.append(arrived)
                last = obj
    except (aiohttp.ClientError, asyncio.TimeoutError, StreamError, ValueError) as e:
        return FailedRequest(req.prompt_len, req.output_len, start, f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if not stamps:
        return FailedRequest(req.prompt_len, req.output_len, start, "the stream held no tokens")
    events = last.get(lifecycle_key) if lifecycle_key else None
    return RequestResult.from_timestamps(req.prompt_len, req.output_len, start, stamps,
                                         events, end_time=end)


# ---------------------------------------------------------------- distserve: POST /generate

async def _generate_records(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[dict, float]]:
    # Newline-delimited JSON; NUL also splits so vLLM 0.2-style "\0"-separated streams parse too.
    async for record, arrived in _split_stream(response, b"\n\0"):
        obj = json.loads(record)
        if "error" in obj:
            raise StreamError(str(obj["error"]))
        yield obj, arrived


async def request_distserve(session: aiohttp.ClientSession, base_url: str, req: TestRequest,
                            options: BackendOptions) -> RequestResult | FailedRequest:
    payload = {"prompt": req.prompt, **sampling_payload(req)}
    return await _post_and_time(session, f"{base_url}/generate", payload, req,
                                _auth_headers(options), _generate_records,
                                lifecycle_key="lifetime_events")


# ---------------------------------------------------------------- openai: POST /v1/completions

async def _sse_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[dict, float]]:
    """Completion chunks of an SSE stream; a chunk without choices (e.g. usage only) is no token."""
    async for record, arrived in _split_stream(response, b"\n"):
        line = record.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue   # SSE comments and event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        obj = json.loads(data)
        if "error" in obj:
            raise StreamError(str(obj["error"]))
        if obj.get("choices"):
            yield obj, arrived


def _auth_headers(options: BackendOptions) -> dict[str, str]:
    return {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}


async def request_openai(session: aiohttp.ClientSession, base_url: str, req: TestRequest,
                         options: BackendOptions) -> RequestResult | FailedRequest:
    if not options.model:
        raise ValueError("the openai backend needs a model name: pass --model or let "
                         "run_benchmark ask the server's /v1/models")
    payload = {"model": options.model, "prompt": req.prompt, **sampling_payload(req)}
    return await _post_and_time(session, f"{base_url}/v1/completions", payload, req,
                                _auth_headers(options), _sse_chunks, lifecycle_key=None)


async def fetch_model_name(session: aiohttp.ClientSession, base_url: str,
                           options: BackendOptions) -> str:
    """The first model an OpenAI-compatible server lists at GET /v1/models."""
    async with session.get(f"{base_url}/v1/models", headers=_auth_headers(options)) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {base_url}/v1/models answered HTTP {response.status}; "
                               f"pass --model explicitly")
        models = (await response.json()).get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no models; pass --model explicitly")
    return models[0]["id"]


RequestFunc = Callable[[aiohttp.ClientSession, str, TestRequest, BackendOptions],
                       Awaitable[RequestResult | FailedRequest]]
REQUEST_FUNCS: dict[str, RequestFunc] = {"distserve": request_distserve, "openai": request_openai}
