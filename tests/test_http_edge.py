"""The HTTP edge under hostile input, over raw sockets: every bad request gets a 4xx (or, for
broken framing and stalled heads, a closed connection), nothing logs a traceback, nothing leaks.

One real engine (opt-tiny, dummy weights) behind apps with short time-outs, so the time-out
cases take a fraction of a second; waits are hang guards, never timed assertions.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import random
import socket
import struct
import threading

import pytest

from dsjax.sampling_params import SamplingParams
from tests._raw_http import HANG_GUARD, body_of, exchange, request_bytes, status_of
from tests._server_helpers import EngineProxy, parse_metrics, wait_until_no_blocks

HEADER_TIMEOUT = BODY_TIMEOUT = 0.5
PROMPT = "The capital of France is"


def limits(**changes):
    from serving.connections import HttpLimits
    return HttpLimits(**{"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT,
                         **changes})


@pytest.fixture(scope="module")
def server(loop):
    return loop.serve(limits=limits(), api_key=None, max_body_bytes=1 << 20)


def run(loop, coro):
    return loop.run(coro, timeout=3 * HANG_GUARD)


def send(loop, served, data: bytes) -> bytes:
    return run(loop, exchange(served.port, data))


# ---- each case, one request -------------------------------------------------------------------

DEEP = b'{"prompt": "hi", "stop": ' + b"[" * 1000 + b"]" * 1000 + b"}"
BAD_GZIP = request_bytes(b"this is not gzip", Content_Encoding="gzip")

EDGE_CASES = {
    # name: (request bytes, status, words the answer must contain)
    "JSON nested 1,000 deep": (request_bytes(DEEP), 400, "nested too deeply"),
    "JSON nested 40 deep": (request_bytes(b'{"prompt": "hi", "stop": ' + b"[" * 40 + b"]" * 40
                                          + b"}"), 400, "nested too deeply"),
    "body not matching Content-Encoding: gzip": (BAD_GZIP, 400, "Content-Encoding"),
    "NaN temperature": (request_bytes(b'{"prompt": "hi", "temperature": NaN}'), 400,
                        "'temperature' must be a finite number"),
    "infinite temperature": (request_bytes(b'{"prompt": "hi", "temperature": 1e999}'), 400,
                             "'temperature' must be a finite number"),
    "best_of 0": (request_bytes({"prompt": "hi", "best_of": 0}), 400, "'best_of' is 0"),
    "best_of -1": (request_bytes({"prompt": "hi", "best_of": -1}), 400, "'best_of' is -1"),
    "a 5,000-digit integer": (request_bytes(b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}"),
                              400, "not valid JSON"),
    "Content-Length 1e9, one byte sent": (request_bytes(b"{")
                                          .replace(b"Content-Length: 1", b"Content-Length: "
                                                   b"1000000000"), 413, "over the limit"),
    "body stalls (Content-Length 1000, one byte sent)": (
        request_bytes(b"{").replace(b"Content-Length: 1", b"Content-Length: 1000"), 408,
        "--body-timeout"),
    "a prompt too long for the context, refused untokenized": (
        request_bytes({"prompt": "x" * 600_000}), 400, "cannot fit the context of 2048 tokens"),
    "a prompt of 150,000 token ids, refused before any per-id check": (
        request_bytes({"prompt": [100] * 150_000}), 400,
        "prompt of 150000 token ids cannot fit the context of 2048 tokens"),
    "foreign Host (DNS rebinding)": (request_bytes({"prompt": "hi"}, Host="evil.example:8400"),
                                     400, "--allowed-hosts"),
    "Host with userinfo after the port": (request_bytes({"prompt": "hi"},
                                                        Host="localhost:80@evil.example"),
                                          400, "Host 'localhost:80@evil.example' is malformed"),
    "gzip body cut before its trailer": (request_bytes(gzip.compress(b'{"prompt": "hi"}')[:-8],
                                                       Content_Encoding="gzip"),
                                         400, "before its end marker and trailer"),
    "gzip body decoding past --max-body-bytes": (
        request_bytes(gzip.compress(b'{"prompt": "' + b"a" * (2 << 20) + b'"}'),
                      Content_Encoding="gzip"), 413, "decodes to over 1048576 bytes"),
    "Content-Encoding br": (request_bytes({"prompt": "hi"}, Content_Encoding="br"), 415,
                            "send the body uncompressed, or as gzip or deflate"),
    "garbage instead of a request line": (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
    "a header line over 8 KiB": (request_bytes({"prompt": "hi"}, X_Long="a" * 9000), 400,
                                 "malformed HTTP request"),
    "cross-origin text/plain POST": (request_bytes({"prompt": "hi"}, Content_Type="text/plain"),
                                     415, "application/json"),
    "form POST (curl -d without -H)": (
        request_bytes({"prompt": "hi"}, Content_Type="application/x-www-form-urlencoded"), 415,
        "-H 'Content-Type: application/json'"),
    "POST without a Content-Type": (request_bytes({"prompt": "hi"}, Content_Type=None), 415,
                                    "Content-Type"),
}


@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_case_is_answered_4xx_naming_the_fix(loop, server, name):
    data, status, words = EDGE_CASES[name]
    raw = send(loop, server, data)
    assert status_of(raw) == status, raw[:300]
    assert words in json.dumps(body_of(raw))


def test_logprobs_zero_passes_the_edge(loop, server):
    """logprobs=0 (the chosen token's logprob only) is valid: the edge passes it on."""
    asked = []

    def add_request(prompt, params, **kwargs):
        asked.append(params.logprobs)
        raise ValueError("recorded")

    proxy = loop.serve(EngineProxy(server.engine, add_request=add_request))
    for path in ("/generate", "/v1/completions"):
        raw = send(loop, proxy, request_bytes({"prompt": "hi", "logprobs": 0}, path=path))
        assert status_of(raw) == 400 and "recorded" in json.dumps(body_of(raw))
    assert asked == [0, 0]


def test_non_utf8_authorization_header_is_401(loop):
    guarded = loop.serve(api_key="k")
    raw = send(loop, guarded, request_bytes({"prompt": "hi"}, Authorization="Bearer \udcff\udcfe"))
    assert status_of(raw) == 401 and "API key" in body_of(raw)["error"]
    raw = send(loop, guarded, request_bytes({"prompt": "hi", "max_tokens": 1},
                                            Authorization="Bearer k"))
    assert status_of(raw) == 200


def test_allowed_hosts(loop, server):
    for host in ("localhost:8400", "127.0.0.1", "[::1]:1", "LOCALHOST."):
        raw = send(loop, server, request_bytes({"prompt": "hi", "max_tokens": 1}, Host=host))
        assert status_of(raw) == 200, host
    named = loop.serve(allowed_hosts=["api.example"])
    assert status_of(send(loop, named, request_bytes({"prompt": "hi", "max_tokens": 1},
                                                     Host="api.example:80"))) == 200
    assert status_of(send(loop, named, request_bytes({"prompt": "hi"}, Host="localhost"))) == 400
    anyone = loop.serve(allowed_hosts=["*"])
    assert status_of(send(loop, anyone, request_bytes({"prompt": "hi", "max_tokens": 1},
                                                      Host="evil.example"))) == 200
    # Probes reach /health by any name.
    raw = send(loop, named, request_bytes(b"", path="/health", method="GET", Host="10.1.2.3"))
    assert status_of(raw) == 200


def test_stalled_request_heads_are_closed(loop, server):
    """Half-sent request lines (slowloris): the server closes each after the header time-out."""
    async def stall(n: int) -> list[bytes]:
        return await asyncio.gather(*[exchange(server.port, b"POST /generate HTT")
                                      for _ in range(n)])
    assert run(loop, stall(200)) == [b""] * 200


class GatedTokenizer:
    """The engine's tokenizer, but `method` waits until the test opens the gate."""

    def __init__(self, tokenizer, method: str = "encode"):
        self.tokenizer = tokenizer
        self.entered, self.gate = threading.Event(), threading.Event()
        setattr(self, method, self._gated(getattr(tokenizer, method)))

    def _gated(self, method):
        def gated(*args, **kwargs):
            self.entered.set()
            assert self.gate.wait(HANG_GUARD)
            return method(*args, **kwargs)
        return gated

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def answered_while_gated(loop, server, method: str, data: bytes) -> tuple[bytes, bytes]:
    """(a /health answer got while `method` of the tokenizer was held, the gated answer):
    were the gated work done on the event loop, /health could not answer until it ended."""
    tokenizer = GatedTokenizer(server.engine.tokenizer, method)
    gated = loop.serve(EngineProxy(server.engine, tokenizer=tokenizer), max_body_bytes=4 << 20)

    async def scenario():
        long = asyncio.ensure_future(exchange(gated.port, data))
        while not tokenizer.entered.is_set():
            await asyncio.sleep(0.01)
        health = await exchange(gated.port, request_bytes(b"", path="/health", method="GET"))
        tokenizer.gate.set()
        return health, await long

    return run(loop, scenario())


def test_a_long_prompt_is_tokenized_off_the_event_loop(loop, server):
    health, long = answered_while_gated(loop, server, "encode", request_bytes(
        {"prompt": "word " * 20_000, "max_tokens": 1}))
    assert status_of(health) == 200
    assert status_of(long) == 400 and "max_model_len" in body_of(long)["error"]


@pytest.mark.parametrize("path,method,body", [
    ("/tokenize", "token_string", {"prompt": "word " * 20_000, "return_token_strs": True}),
    ("/detokenize", "decode", {"tokens": [100] * 20_000}),
], ids=["tokenize with token_strs", "detokenize"])
def test_large_tokenizer_work_runs_off_the_event_loop(loop, server, path, method, body):
    health, answer = answered_while_gated(loop, server, method, request_bytes(body, path=path))
    assert status_of(health) == 200 and status_of(answer) == 200


def test_tokenizer_routes_bound_their_input(loop):
    served = loop.serve(max_body_bytes=4 << 20)
    raw = send(loop, served, request_bytes({"prompt": "a" * (3 << 20)}, path="/tokenize"))
    assert status_of(raw) == 400 and "over /tokenize's limit of" in \
        body_of(raw)["error"]["message"]
    raw = send(loop, served, request_bytes({"tokens": [100] * 70_000}, path="/detokenize"))
    assert status_of(raw) == 400 and "70000 token ids are over /detokenize's limit of 65536" in \
        body_of(raw)["error"]["message"]


def test_overload_is_refused_with_retry_after_and_counted(loop, server):
    """A request estimated to miss the TPOT bound gets 503 with the estimate's drain time as
    Retry-After, counted in /metrics by cause; within the bounds it is served."""
    from serving.api_server import CLIENT
    from tests.test_admission import StubEstimator
    served = loop.serve()
    admission = served.app[CLIENT].admission
    admission.estimator = StubEstimator(tpot=2.0, tpot_wait=7.2)
    raw = send(loop, served, request_bytes({"prompt": "hi"}))
    assert status_of(raw) == 503 and b"Retry-After: 8" in raw
    assert "about 2.000 s per output token" in body_of(raw)["error"]
    text = send(loop, served, request_bytes(b"", path="/metrics", method="GET"))
    samples = parse_metrics(text.split(b"\r\n\r\n", 1)[1].decode())
    rejected = {s[0]["reason"]: s[1] for s in samples["dsjax_admission_rejections_total"]}
    assert rejected["tpot_slo"] == 1 and sum(rejected.values()) == 1
    admission.estimator = StubEstimator(tpot=0.01)
    assert status_of(send(loop, served, request_bytes({"prompt": "hi", "max_tokens": 1}))) == 200


def test_the_estimate_reads_the_engines_stats(loop, server):
    """Sampled while a request runs, the engine's stats give a prefill step time and a decode
    step time: the keys the estimate reads are the ones the engine reports."""
    from serving.load_estimate import LoadEstimator
    estimator = LoadEstimator(server.engine)
    done = threading.Event()
    # Sampled once before the request: its prefill step is then always between two samples
    # (sampled after, a prefill faster than the first sample went unseen: flaky). Long enough
    # that several samples see its decode steps.
    estimator.sample()
    server.engine.add_request(PROMPT, SamplingParams(max_tokens=160, ignore_eos=True),
                              on_output=lambda out: getattr(out, "finished", True) and done.set())
    while not done.wait(0.03):
        estimator.sample()
    assert estimator.prefill_step.value() > 0 and estimator.step_time(1) > 0
    estimate = estimator.estimate(0, [8], 1, 16)
    assert 0 < estimate.ttft < 10 and 0 < estimate.tpot < 10


# ---- the hostile run ---------------------------------------------------------------------------

def hostile_requests(rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, request) pairs: every kind of bad input this file covers, and then some."""
    good = json.dumps({"prompt": PROMPT, "max_tokens": 4}).encode()
    chunked = request_bytes(b"", Content_Length=None, Transfer_Encoding="chunked")
    kinds = {
        "bad JSON": lambda: request_bytes(good[:rng.randrange(1, len(good) - 1)]),
        "wrong types": lambda: request_bytes(rng.choice([
            {"prompt": 5}, {"prompt": {"a": 1}}, {"prompt": "hi", "max_tokens": "many"},
            {"prompt": "hi", "stop": [1, 2]}, {"prompt": [1.5, 2]}, {"prompt": "hi", "n": None,
                                                                     "stream": "yes"}])),
        "huge numbers": lambda: request_bytes(rng.choice([
            {"prompt": "hi", "max_tokens": 10 ** 30}, {"prompt": "hi", "seed": 2 ** 70},
            {"prompt": [2, 10 ** 12]}, b'{"prompt": "hi", "top_k": 1e400}',
            b'{"prompt": "hi", "max_tokens": ' + b"7" * 4400 + b"}"])),
        "NaN": lambda: request_bytes(rng.choice([b'{"prompt": "hi", "temperature": NaN}',
                                                 b'{"prompt": "hi", "top_p": -Infinity}'])),
        "bad encodings": lambda: rng.choice([
            BAD_GZIP, request_bytes(b'{"prompt": "\xff\xfe"}'),
            request_bytes("{}".encode("utf-16")), request_bytes(gzip.compress(b"[1, 2]"),
                                                                Content_Encoding="gzip"),
            request_bytes({"prompt": "hi"}, Host="\udcff\udcfe")]),
        "bad framing": lambda: rng.choice([
            b"GARBAGE\r\n\r\n", b"POST /generate HTTP/1.1\r\nHost localhost\r\n\r\n",
            request_bytes(good, Transfer_Encoding="chunked"),
            chunked + b"zz\r\nnot hex\r\n0\r\n\r\n",
            b"GET /health HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
            b"POST /generate HTTP/9.9\r\n\r\n"]),
        "slowloris": lambda: b"POST /generate HTTP/1.1\r\nHost: localh",
        "foreign hosts": lambda: request_bytes(good, Host=rng.choice(
            ["evil.example", "127.0.0.1.nip.io:8400", "[::2]"])),
        "content types": lambda: request_bytes(good, Content_Type=rng.choice(
            ["text/plain", "multipart/form-data; boundary=x", "application/xml", None])),
        "deep JSON": lambda: request_bytes(rng.choice([
            b"[" * 100_000, b'{"prompt": ' + b"[" * 990 + b"]" * 990 + b"}"])),
        "bad chat": lambda: request_bytes(rng.choice([
            {"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            {"messages": "hi"}]), path="/v1/chat/completions"),
        "bad batches": lambda: request_bytes(rng.choice([
            {"prompt": ["a", 5]}, {"prompt": [[]]}, {"prompt": [[2, 50272]]},
            {"prompt": ["a"] * 3, "max_tokens": 5000}]), path="/v1/completions"),
        "unknown routes": lambda: request_bytes(b"", path=rng.choice(["/admin", "/v2/x", "/.env"]),
                                                method=rng.choice(["GET", "DELETE", "PUT"])),
    }
    names = sorted(kinds)
    return [(kind, kinds[kind]()) for kind in (names * 100)[:1000]]


async def disconnect_mid_stream(port: int) -> None:
    """A streaming request abandoned after its first token (the socket reset, not closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes({"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True,
                                "stream": True}))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD)
    assert status_of(head) == 200, head
    await asyncio.wait_for(reader.readuntil(b"\n"), HANG_GUARD)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def leave_before_the_answer(port: int) -> None:
    """A client that sends a streaming request and hangs up before the answer's headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes({"prompt": PROMPT, "max_tokens": 64, "stream": True}))
    writer.write_eof()
    await writer.drain()
    writer.close()


async def in_waves(coros, size: int):
    results = []
    for start in range(0, len(coros), size):
        results += await asyncio.gather(*coros[start:start + size])
    return results


def test_server_survives_a_hostile_run(loop, caplog):
    """1,000 malformed or hostile requests, 200 clients leaving mid-stream and 100 before the
    answer began: every answer a 4xx (stalled or broken framing: closed), no traceback logged,
    no KV block leaked, and a normal request is still served."""
    # Admission by cost is off here (it has its own tests): it may rightly refuse the abandoned
    # 1,500-token streams this run needs answered, when the module's earlier tests left the
    # engine's measured step times high.
    hostile = loop.serve(limits=limits(max_connections=256), max_body_bytes=1 << 20,
                         max_queue_delay=math.inf, max_tpot=math.inf)
    requests = hostile_requests(random.Random(0))
    caplog.set_level(logging.INFO)
    answers = run(loop, in_waves([exchange(hostile.port, data) for _, data in requests], 100))
    run(loop, in_waves([disconnect_mid_stream(hostile.port) for _ in range(200)], 20))
    run(loop, in_waves([leave_before_the_answer(hostile.port) for _ in range(100)], 20))

    by_kind: dict[str, set] = {}
    for (kind, _), raw in zip(requests, answers):
        by_kind.setdefault(kind, set()).add(status_of(raw))
    assert by_kind.pop("slowloris") == {None}
    for kind, statuses in by_kind.items():
        assert all(s is not None and 400 <= s < 500 for s in statuses - {None}), (kind, statuses)
    assert not any(wait_until_no_blocks(hostile.engine).values())
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks[:5]]
    raw = send(loop, hostile, request_bytes({"prompt": PROMPT, "max_tokens": 4,
                                             "ignore_eos": True}))
    assert status_of(raw) == 200 and len(body_of(raw)["token_ids"]) == 4
    metrics = send(loop, hostile, request_bytes(b"", path="/metrics", method="GET"))
    samples = parse_metrics(metrics.split(b"\r\n\r\n", 1)[1].decode())
    assert not [s for s in samples["dsjax_http_errors_total"] if s[0]["status"].startswith("5")]


def test_json_depth_bound_is_exact():
    """32 levels (the body object and 31 nested lists) parse; one more is refused, whatever
    the caller's stack depth."""
    from serving.api_errors import ApiError
    from serving.request_fields import MAX_JSON_DEPTH, parse_json_object

    def nested(levels):
        return b'{"stop": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"

    assert parse_json_object(nested(MAX_JSON_DEPTH)) == {"stop": json.loads(b"[" * 31 + b"]" * 31)}
    with pytest.raises(ApiError, match="nested too deeply"):
        parse_json_object(nested(MAX_JSON_DEPTH + 1))
