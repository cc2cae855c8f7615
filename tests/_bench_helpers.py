"""Shared by the evaluation-workflow tests: fixture paths and a tiny fake LLM HTTP server."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL_NAME = "fake-opt"
EVENTS = ["issued", "context_begin", "context_end", "migration_begin", "migration_end",
          "decoding_begin", "decoding_end"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeLLMServer:
    """Streams `max_tokens` tokens: the first after `first_delay` s, then one every `gap` s.

    Prompts starting with FAIL get HTTP 500 (/generate) or an in-stream error (/v1/completions);
    DROP gets one token and then a closed connection."""

    def __init__(self, first_delay: float = 0.06, gap: float = 0.03):
        self.first_delay, self.gap = first_delay, gap
        self.payloads: list[dict] = []
        self.headers: list[dict] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> "FakeLLMServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _record(self, request: web.Request) -> dict:
        payload = await request.json()
        self.payloads.append(payload)
        self.headers.append(dict(request.headers))
        return payload

    async def _tokens(self, count: int):
        await asyncio.sleep(self.first_delay)
        for i in range(count):
            if i:
                await asyncio.sleep(self.gap)
            yield i

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        payload = await self._record(request)
        if payload["prompt"].startswith("FAIL"):
            return web.json_response({"error": "fake failure"}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        n = payload["max_tokens"]
        async for i in self._tokens(n):
            obj = {"text": f" t{i}", "token_id": 100 + i, "timestamp": time.perf_counter(),
                   "finished": i == n - 1}
            if i == n - 1:
                obj["finish_reason"] = "length"
                obj["lifetime_events"] = [{"timestamp": 1.0 + k, "event_type": e}
                                          for k, e in enumerate(EVENTS)]
            await resp.write(json.dumps(obj).encode() + b"\n")
            if payload["prompt"].startswith("DROP"):
                request.transport.close()
                return resp
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        payload = await self._record(request)
        if payload.get("model") != MODEL_NAME:
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keep-alive comment\n\n")
        n = payload["max_tokens"]
        async for i in self._tokens(n):
            if payload["prompt"].startswith("FAIL"):
                await resp.write(b'data: {"error": {"message": "fake failure"}}\n\n')
                return resp
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": MODEL_NAME,
                     "choices": [{"index": 0, "text": f" t{i}", "logprobs": None,
                                  "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"id": "cmpl-1", "choices": [], "usage": {"completion_tokens": n}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
