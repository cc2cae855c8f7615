"""The HTTP server end to end: a real engine (opt-tiny, dummy weights) behind real sockets.

One engine for the module, served by two apps on free loopback ports: an open one, and a
guarded one (API key, admission bound 1) to test auth and overload without restarting.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading
import time

import openai
import pytest

from dsjax.config import EngineConfig
from dsjax.eval.workloads import TestRequest
from dsjax.engine.core import Engine
from dsjax.sampling_params import SamplingParams
from serving.api_server import METRICS, create_app, start_server, stop_server
from serving.bench import run_benchmark

API_KEY = "test-key"
MAX_BODY = 64 << 10
LONG = 1500  # max_tokens that cannot finish during a test step; the tests abort these requests


class Served:
    def __init__(self, engine, app, port):
        self.engine, self.app, self.port = engine, app, port
        self.base_url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        """(status, headers, parsed JSON or text) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, resp, json.loads(raw) if "json" in ctype else raw.decode()

    def post(self, path: str, body, headers: dict | None = None):
        return self.request("POST", path, body, headers)

    def open_stream(self, path: str, body: dict, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        return conn, conn.getresponse()


@pytest.fixture(scope="module")
def servers():
    engine = Engine(EngineConfig(model="opt-tiny", load_format="dummy", dtype="float32",
                                 num_blocks=256, block_size=16))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def make(**kwargs):
        app = create_app(engine, **kwargs)
        runner, port = await start_server(app, "127.0.0.1", 0)
        return app, runner, port

    open_app = on_loop(make(max_body_bytes=MAX_BODY))
    guarded_app = on_loop(make(api_key=API_KEY, max_queue=1))
    yield Served(engine, open_app[0], open_app[2]), Served(engine, guarded_app[0], guarded_app[2])
    for app, runner, _ in (open_app, guarded_app):
        on_loop(stop_server(app, runner))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    engine.shutdown()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def engine_tokens(engine, prompt, **params) -> list[int]:
    return engine.add_request(prompt, SamplingParams(**params)).result(timeout=120).token_ids


def wait_until_no_blocks(engine, timeout: float = 5.0) -> dict:
    """Blocks held once the engine is idle; the timeout is far below the LONG requests' run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = engine.blocks_in_use()
        if not any(held.values()) and not engine.has_unfinished():
            return held
        time.sleep(0.05)
    return engine.blocks_in_use()


PROMPT = "The capital of France is"


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, seed=1234)],
                         ids=["greedy", "seeded"])
def test_generate_gives_the_engines_tokens(server, params):
    params = dict(params, max_tokens=6, ignore_eos=True)
    expected = engine_tokens(server.engine, PROMPT, **params)
    status, _, answer = server.post("/generate", {"prompt": PROMPT, **params})
    assert status == 200, answer
    assert answer["token_ids"] == expected
    assert answer["finish_reason"] == "length"
    assert answer["text"] == server.engine.tokenizer.decode(expected)
    assert len(answer["timestamps"]) == 6
    assert answer["timestamps"][0] <= time.perf_counter()   # the server's perf_counter clock
    events = [e["event_type"] for e in answer["lifetime_events"]]
    assert events == ["issued", "context_begin", "context_end", "migration_begin",
                      "migration_end", "decoding_begin", "decoding_end"]


def test_generate_streams_one_json_object_per_token(server):
    ids = server.engine.tokenizer.encode(PROMPT)
    expected = engine_tokens(server.engine, ids, temperature=0.0, max_tokens=5, ignore_eos=True)
    conn, resp = server.open_stream("/generate", {"prompt": ids, "max_tokens": 5,
                                                  "temperature": 0, "ignore_eos": True,
                                                  "stream": True, "logprobs": 2})
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/x-ndjson"
    records = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    conn.close()
    assert [r["token_id"] for r in records] == expected
    assert [r["finished"] for r in records] == [False] * 4 + [True]
    assert records[-1]["finish_reason"] == "length" and records[-1]["lifetime_events"]
    assert "".join(r["text"] for r in records) == server.engine.tokenizer.decode(expected)
    assert all(str(r["token_id"]) in r["logprobs"] for r in records)


def test_distserve_style_payload_is_accepted(server):
    # What DistServe's and vLLM 0.2's clients send, fields at their neutral values included.
    payload = {"prompt": PROMPT, "n": 1, "best_of": 1, "use_beam_search": False,
               "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 3,
               "ignore_eos": True, "stream": False, "presence_penalty": 0.0,
               "frequency_penalty": 0.0, "repetition_penalty": 1.0, "stop": [],
               "stop_token_ids": [], "logprobs": None, "skip_special_tokens": True,
               "spaces_between_special_tokens": True, "seed": None}
    status, _, answer = server.post("/generate", payload)
    assert status == 200, answer
    assert len(answer["token_ids"]) == 3


def test_openai_client_completions(server):
    expected = engine_tokens(server.engine, PROMPT, temperature=0.0, max_tokens=7,
                             ignore_eos=True)
    text = server.engine.tokenizer.decode(expected)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    assert model == "opt-tiny"
    extra = {"ignore_eos": True}
    done = client.completions.create(model=model, prompt=PROMPT, max_tokens=7, temperature=0,
                                     extra_body=extra)
    assert done.choices[0].text == text
    assert done.choices[0].finish_reason == "length"
    prompt_len = len(server.engine.tokenizer.encode(PROMPT))
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_len, 7)

    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=7,
                                            temperature=0, stream=True, extra_body=extra))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 7
    assert "".join(c.choices[0].text for c in token_chunks) == text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 7


BAD_GENERATE = [
    (b'{"prompt": "hi", ', 400, "not valid JSON"),
    (b'["hi"]', 400, "JSON object"),
    ({"max_tokens": 4}, 400, "'prompt' is required"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ({"prompt": 5}, 400, "'prompt' must be a string or a list of token ids"),
    ({"prompt": "hi", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"prompt": "hi", "temprature": 0.5}, 400, "unknown field(s) ['temprature']"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens must be >= 1"),
    ({"prompt": "hi", "max_tokens": 2047}, 400, "exceeds the model's context"),
    ({"prompt": ""}, 400, "'prompt' is empty"),
    ({"prompt": []}, 400, "'prompt' is empty"),
    ({"prompt": [2, 50272]}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "n": 2}, 400, "n=2"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of=3"),
    ({"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 1.2}, 400, "repetition_penalty"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_k": 10**12}, 400, "outside the 32-bit integer range"),
    ({"prompt": "hi", "stop_token_ids": [10**15]}, 400, "outside the 32-bit integer range"),
    ({"prompt": "x" * (MAX_BODY + 10)}, 413, "too large"),
]


@pytest.mark.parametrize("body,status,message", BAD_GENERATE,
                         ids=[m for _, _, m in BAD_GENERATE])
def test_bad_generate_input_is_answered_4xx(server, body, status, message):
    got, _, answer = server.post("/generate", body)
    assert got == status, answer
    assert message in answer["error"]


BAD_COMPLETIONS = [
    ({"model": "opt-13b", "prompt": "hi"}, 404, "not served here"),
    ({"prompt": "hi"}, 400, "'model' is required"),
    ({"model": "opt-tiny", "prompt": "hi", "n": 2}, 400, "n=2"),
    ({"model": "opt-tiny", "prompt": "hi", "echo": True}, 400, "echo"),
    ({"model": "opt-tiny", "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"model": "opt-tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens'"),
]


@pytest.mark.parametrize("body,status,message", BAD_COMPLETIONS,
                         ids=[m for _, _, m in BAD_COMPLETIONS])
def test_bad_completions_input_is_answered_openai_style(server, body, status, message):
    got, _, answer = server.post("/v1/completions", body)
    assert got == status, answer
    assert message in answer["error"]["message"]


def test_server_serves_on_after_bad_input(server):
    assert server.request("GET", "/nowhere")[0] == 404
    assert server.request("GET", "/generate")[0] == 405
    status, _, answer = server.post("/generate", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and len(answer["token_ids"]) <= 2
    assert server.request("GET", "/health")[2] == {"status": "ok"}
    assert not any(wait_until_no_blocks(server.engine).values())


def aborted(served) -> int:
    return served.app[METRICS].finished["abort"]


def test_stream_disconnect_aborts_and_frees_blocks(server):
    aborts = aborted(server)
    conn, resp = server.open_stream("/generate", {"prompt": PROMPT, "max_tokens": LONG,
                                                  "ignore_eos": True, "stream": True})
    first = json.loads(resp.readline())
    assert first["finished"] is False
    assert any(server.engine.blocks_in_use().values())
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert not any(wait_until_no_blocks(server.engine).values())
    assert aborted(server) == aborts + 1


def test_non_streaming_disconnect_aborts_and_frees_blocks(server):
    aborts = aborted(server)
    body = json.dumps({"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not any(server.engine.blocks_in_use().values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(server.engine.blocks_in_use().values())
    assert not any(wait_until_no_blocks(server.engine).values())
    assert aborted(server) == aborts + 1


def parse_prometheus(text: str) -> dict[str, list[tuple[str, float]]]:
    """Sample name -> [(labels, value)], checking every line against the text format."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})?'
                        r' (-?[0-9.e+-]+|\+Inf|NaN)$')
    samples: dict[str, list] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = sample.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples.setdefault(match.group(1), []).append((match.group(2) or "",
                                                       float(match.group(3))))
    return samples


def test_metrics_expose_latency_queues_blocks_and_errors(server):
    server.post("/generate", {"prompt": "hi", "max_tokens": 2})
    server.post("/generate", {"prompt": "hi", "max_tokens": "ten"})
    status, resp, text = server.request("GET", "/metrics")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    samples = parse_prometheus(text)
    for name in ("dsjax_time_to_first_token_seconds_bucket",
                 "dsjax_time_to_first_token_seconds_count",
                 "dsjax_time_per_output_token_seconds_sum", "dsjax_requests_waiting",
                 "dsjax_requests_running", "dsjax_requests_swapped", "dsjax_kv_blocks_used",
                 "dsjax_kv_blocks_total", "dsjax_migrations_total", "dsjax_migration_seconds_total",
                 "dsjax_migration_bytes_total", "dsjax_requests_finished_total",
                 "dsjax_http_errors_total", "dsjax_requests_in_flight"):
        assert name in samples, name
    assert dict(samples["dsjax_kv_blocks_total"]) == {'{instance="prefill0"}': 256.0,
                                                      '{instance="decode0"}': 256.0}
    assert dict(samples["dsjax_http_errors_total"])['{status="400"}'] >= 1
    assert dict(samples["dsjax_requests_finished_total"])['{finish_reason="length"}'] >= 1
    assert samples["dsjax_migrations_total"][0][1] >= 1
    assert samples["dsjax_time_to_first_token_seconds_count"][0][1] >= 1


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_api_key_is_required_except_for_health(servers):
    guarded = servers[1]
    assert guarded.request("GET", "/health")[0] == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, resp, answer = guarded.request("GET", "/v1/models", headers=headers)
        assert status == 401 and "API key" in answer["error"]["message"]
        assert guarded.post("/generate", {"prompt": "hi"}, headers)[0] == 401
    assert guarded.request("GET", "/v1/models", headers=AUTH)[0] == 200
    assert guarded.request("GET", "/metrics", headers=AUTH)[0] == 200
    status, _, answer = guarded.post("/generate", {"prompt": "hi", "max_tokens": 2}, AUTH)
    assert status == 200, answer


def test_admission_bound_answers_503_with_retry_after(servers):
    guarded = servers[1]
    conn, resp = guarded.open_stream("/generate", {"prompt": PROMPT, "max_tokens": LONG,
                                                   "ignore_eos": True, "stream": True}, AUTH)
    assert json.loads(resp.readline())["finished"] is False   # admitted and running
    status, resp503, answer = guarded.post("/generate", {"prompt": "hi"}, AUTH)
    assert status == 503 and "admission bound of 1" in answer["error"]
    assert resp503.getheader("Retry-After") == "1"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert not any(wait_until_no_blocks(guarded.engine).values())
    # The slot is free again once the aborted request is accounted for.
    deadline = time.monotonic() + 10
    while (status := guarded.post("/generate", {"prompt": "hi", "max_tokens": 1},
                                  AUTH)[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200


# Last: it is the one test with concurrent requests, so engine races surface here.
def test_our_bench_client_runs_against_the_server(server, tmp_path):
    requests = [TestRequest(PROMPT, 6, 4), TestRequest("Hello", 2, 3)]
    for backend in ("distserve", "openai"):
        results, failures = run_benchmark(backend, server.base_url, requests, rate=float("inf"),
                                          exp_path=tmp_path / f"{backend}.exp", progress=False)
        assert not failures, failures
        assert sorted(r.output_len for r in results) == [3, 4]
        assert all(len(r.token_timestamps) == r.output_len for r in results)
    assert (tmp_path / "distserve.exp").is_file()
