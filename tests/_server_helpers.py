"""HTTP server fixtures: a tiny real engine, apps served on free loopback ports from an event loop
in a thread, and a plain http.client to talk to them."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

from dsjax.config import EngineConfig
from dsjax.engine.core import Engine
from dsjax.sampling_params import SamplingParams
from serving.api_server import create_app, start_server, stop_server

# max_model_len 2048: the model's context (128 blocks of 16 per request fit the pool of 256).
TINY_SERVER_ENGINE = dict(model="opt-tiny", load_format="dummy", dtype="float32", num_blocks=256,
                          block_size=16)
JSON = {"Content-Type": "application/json"}


def tiny_engine(**overrides) -> Engine:
    return Engine(EngineConfig(**{**TINY_SERVER_ENGINE, **overrides}))


class EngineProxy:
    """A real engine with some attributes replaced: fault injection without a fake engine."""

    def __init__(self, engine, **replaced):
        self._engine = engine
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class Served:
    def __init__(self, engine, app, port):
        self.engine, self.app, self.port = engine, app, port
        self.base_url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        """(status, response, parsed JSON or text) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={**JSON, **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, resp, json.loads(raw) if "json" in ctype else raw.decode()

    def post(self, path: str, body, headers: dict | None = None):
        return self.request("POST", path, body, headers)

    def open_stream(self, path: str, body: dict, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", path, body=json.dumps(body).encode(), headers={**JSON,
                                                                            **(headers or {})})
        return conn, conn.getresponse()


class ServerLoop:
    """An event loop in a thread serving apps of one engine until close()."""

    def __init__(self, engine):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.apps = []

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, engine=None, **kwargs) -> Served:
        """An app of `engine` (default: the loop's) made by create_app(**kwargs), listening."""
        engine = engine or self.engine

        async def make():
            app = create_app(engine, **kwargs)
            runner, port = await start_server(app, "127.0.0.1", 0)
            return app, runner, port

        app, runner, port = self.run(make())
        self.apps.append((app, runner))
        return Served(engine, app, port)

    def close(self) -> None:
        for app, runner in self.apps:
            self.run(stop_server(app, runner))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def engine_tokens(engine, prompt, **params) -> list[int]:
    return engine.add_request(prompt, SamplingParams(**params)).result(timeout=120).token_ids


def wait_until_no_blocks(engine, timeout: float = 10.0) -> dict:
    """Blocks held once the engine is idle; the timeout is far below the long requests' run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = engine.blocks_in_use()
        if not any(held.values()) and not engine.has_unfinished():
            return held
        time.sleep(0.05)
    return engine.blocks_in_use()


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Sample name -> [(labels, value)], parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples
