"""The HTTP server end to end: a real engine (opt-tiny, dummy weights) behind real sockets.

One engine for the module, served by two apps on free loopback ports: an open one, and a
guarded one (API key, admission bound 1) to test auth and overload without restarting.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import time

import openai
import pytest

from dsjax.eval.workloads import TestRequest
from serving.bench import run_benchmark
from dsjax.sampling_params import SamplingParams
from tests._server_helpers import EngineProxy, engine_tokens, parse_metrics, wait_until_no_blocks

API_KEY = "test-key"
MAX_BODY = 64 << 10
LONG = 1500  # max_tokens that cannot finish during a test step; the tests abort these requests


@pytest.fixture(scope="module")
def servers(loop):
    return loop.serve(max_body_bytes=MAX_BODY), loop.serve(api_key=API_KEY, max_queue=1)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


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
    assert len(chunks) == 7 and all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"

    # As OpenAI: the usage chunk (empty choices) only with stream_options.include_usage.
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=7,
                                            temperature=0, stream=True, extra_body=extra,
                                            stream_options={"include_usage": True}))
    assert [bool(c.choices) for c in chunks] == [True] * 7 + [False]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (prompt_len, 7)


def engine_logprobs(engine, prompt, max_tokens: int) -> list[float]:
    """The chosen tokens' logprobs of a greedy run, from the engine itself."""
    out = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                    ignore_eos=True, logprobs=1)
                             ).result(timeout=120)
    return [table[t] for t, table in zip(out.token_ids, out.logprobs)]


def test_logprobs_zero_is_passed_through_and_formatted(loop, server):
    """logprobs=0 asks for the chosen token's logprob only. The engine gets 0; its answer (here:
    the real engine's tables cut to the chosen token, as a fixed engine gives) is formatted as
    OpenAI's: token_logprobs, and top_logprobs empty."""
    asked = []

    def add_request(prompt, params, **kwargs):
        asked.append(params.logprobs)
        on_output = kwargs.pop("on_output")

        def chosen_only(output):
            if not isinstance(output, BaseException) and output.logprobs is not None:
                for seq in output.outputs:   # what the server reads: the history's tables
                    seq.history = seq.history._replace(logprobs=[
                        {t: table[t]} for t, table in zip(seq.token_ids, seq.logprobs)])
            on_output(output)
        return server.engine.add_request(prompt, dataclasses.replace(params, logprobs=1),
                                         on_output=chosen_only, **kwargs)

    proxy = loop.serve(EngineProxy(server.engine, add_request=add_request))
    full = engine_logprobs(server.engine, PROMPT, max_tokens=4)
    status, _, answer = proxy.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4,
                                                       "temperature": 0, "ignore_eos": True,
                                                       "logprobs": 0})
    assert status == 200, answer
    assert asked == [0]
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == pytest.approx(full)
    assert logprobs["top_logprobs"] == [{}] * 4 and len(logprobs["tokens"]) == 4


BAD_GENERATE = [
    (b'{"prompt": "hi", ', 400, "not valid JSON"),
    (b'["hi"]', 400, "JSON object"),
    ({"max_tokens": 4}, 400, "'prompt' is required"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ({"prompt": 5}, 400, "'prompt' must be a string or a list of token ids"),
    ({"prompt": "hi", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"prompt": "hi", "temprature": 0.5}, 400, "unknown field(s) ['temprature']"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' is 0: it must be >= 1"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "'max_tokens' is -3: it must be >= 1"),
    ({"prompt": "hi", "max_tokens": 2047}, 400, "lower max_tokens to at most 2046"),
    ({"prompt": ""}, 400, "'prompt' is empty"),
    ({"prompt": []}, 400, "'prompt' is empty"),
    ({"prompt": [2, 50272]}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "n": 0}, 400, "'n' is 0: it must be in [1, 64]"),
    ({"prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of must be in [n=3, 64]"),
    ({"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ({"prompt": "hi", "presence_penalty": 2.5}, 400, "'presence_penalty' is 2.5"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty must be in (0, 2]"),
    ({"prompt": "hi", "prompt_logprobs": 21}, 400, "'prompt_logprobs' is 21"),
    ({"prompt": "hi", "temperature": -1}, 400, "'temperature' is -1: it must be >= 0"),
    (b'{"prompt": "hi", "top_p": 1e400}', 400, "'top_p' must be a finite number"),
    ({"prompt": "hi", "logprobs": 21}, 400, "'logprobs' is 21: it must be in [0, 20]"),
    ({"prompt": "hi", "top_k": 10**12}, 400, "outside the 32-bit integer range"),
    ({"prompt": "hi", "stop_token_ids": [10**15]}, 400, "outside the 32-bit integer range"),
    ({"prompt": "x" * (MAX_BODY + 10)}, 413, "over the limit"),
]


@pytest.mark.parametrize("body,status,message", BAD_GENERATE,
                         ids=[m for _, _, m in BAD_GENERATE])
def test_bad_generate_input_is_answered_4xx(server, body, status, message):
    got, _, answer = server.post("/generate", body)
    assert got == status, answer
    assert message in answer["error"]


BAD_COMPLETIONS = [
    ({"model": "opt-13b", "prompt": "hi"}, 404, "not served here", "model"),
    ({"prompt": "hi", "n": 65}, 400, "'n' is 65", "n"),
    ({"prompt": "hi", "echo": "yes"}, 400, "'echo' must be true or false", "echo"),
    ({"prompt": "hi", "n": 2, "best_of": 3, "stream": True}, 400, "cannot be streamed",
     "best_of"),
    ({"prompt": ["a", 5]}, 400, "must be a string or a list of token ids", "prompt"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens'", "max_tokens"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "only allowed with stream=true", "stream_options"),
    ({"prompt": "hi", "guided_json": {"type": "object"}}, 400, "structured", "guided_json"),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, 400, "structured",
     "response_format"),
    ({"prompt": "hi", "truncate_prompt_tokens": 10}, 400, "shorten the prompt",
     "truncate_prompt_tokens"),
    ({"prompt": "hi", "logit_bias": {"fifty": 10}}, 400, "map token ids to numbers",
     "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"50": 101}}, 400, "must be in [-100, 100]", "logit_bias"),
]


@pytest.mark.parametrize("body,status,message,param", BAD_COMPLETIONS,
                         ids=[m for _, _, m, _ in BAD_COMPLETIONS])
def test_bad_completions_input_is_answered_in_vllms_error_shape(server, body, status, message,
                                                               param):
    got, _, answer = server.post("/v1/completions", body)
    assert got == status, answer
    assert answer["error"]["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert (answer["error"]["code"], answer["error"]["param"]) == (status, param)
    assert message in answer["error"]["message"]


def test_server_serves_on_after_bad_input(server):
    assert server.request("GET", "/nowhere")[0] == 404
    assert server.request("GET", "/generate")[0] == 405
    status, _, answer = server.post("/generate", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and len(answer["token_ids"]) <= 2
    assert server.request("GET", "/health")[2] == {
        "status": "ok", "ok": True, "instances": {"prefill0": "ok", "decode0": "ok"}}
    assert not any(wait_until_no_blocks(server.engine).values())


def metric(served, name: str, **labels) -> float:
    """A sample's value from GET /metrics (0 when absent)."""
    samples = parse_metrics(served.request("GET", "/metrics")[2])
    return sum(v for sample_labels, v in samples.get(name, [])
               if labels.items() <= sample_labels.items())


def aborted(served) -> float:
    return metric(served, "vllm:request_success_total", finished_reason="abort")


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
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not any(server.engine.blocks_in_use().values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(server.engine.blocks_in_use().values())
    assert not any(wait_until_no_blocks(server.engine).values())
    assert aborted(server) == aborts + 1


class FailingEngine(EngineProxy):
    """The real engine, but the engine "fails" every request of more than one token at its
    first output (after delivering it, when streaming): the callback gets an Exception, as
    when one request fails inside the engine. The real engine streams either way, so a
    non-streaming request fails at its first token too, not after its last."""

    def add_request(self, prompt, params, *, on_output, stream=True, **kwargs):
        injected = []

        def fail_after_first(output):
            if params.max_tokens <= 1:   # passed through, as the server asked for it
                if stream or isinstance(output, BaseException) or output.finished:
                    on_output(output)
                return
            if injected:
                return
            injected.append(True)
            if stream and not isinstance(output, BaseException) and not output.finished:
                on_output(output)
            on_output(RuntimeError("injected failure"))
        return self._engine.add_request(prompt, params, on_output=fail_after_first,
                                        stream=True, **kwargs)


def test_a_request_the_engine_fails_is_answered_500_and_the_server_serves_on(loop, server):
    failing = loop.serve(FailingEngine(server.engine))
    long = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}
    status, _, answer = failing.post("/generate", long)
    assert status == 500 and "injected failure" in answer["error"]
    status, _, answer = failing.post("/v1/completions", long)
    assert status == 500 and answer["error"]["type"] == "InternalServerError"

    conn, resp = failing.open_stream("/generate", {**long, "stream": True})
    records = [json.loads(line) for line in resp.read().splitlines()]
    assert records[0]["finished"] is False and "injected failure" in records[-1]["error"]
    conn, resp = failing.open_stream("/v1/completions", {**long, "stream": True})
    events = [e for e in resp.read().decode().split("\n\n") if e]
    assert "injected failure" in json.loads(events[-2][6:])["error"]["message"]
    assert events[-1] == "data: [DONE]"
    assert not any(wait_until_no_blocks(server.engine).values())   # the rest was aborted
    assert failing.post("/generate", {"prompt": "hi", "max_tokens": 1})[0] == 200
    assert server.post("/generate", {"prompt": "hi", "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("ok,code,status", [
    (False, 503, "engine failed: decode0: failed: XlaRuntimeError"),
    (True, 200, "degraded: decode0: failed: XlaRuntimeError"),
], ids=["cannot serve", "degraded"])
def test_health_names_a_failed_instance(loop, server, ok, code, status):
    state = {"ok": ok, "instances": {"prefill0": "ok", "decode0": "failed: XlaRuntimeError"}}
    sick = loop.serve(EngineProxy(server.engine, health=lambda: state))
    got, _, answer = sick.request("GET", "/health")
    assert got == code and answer["status"] == status


VLLM_METRICS = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
    "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
    "vllm:request_success"]


def test_metrics_have_vllms_names_and_dsjaxs_own(server):
    """prometheus_client's parser reads the exposition; every vLLM family is there with the
    model_name label, histograms count this request's phases, dsjax's series name instances."""
    server.post("/generate", {"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    server.post("/generate", {"prompt": "hi", "max_tokens": "ten"})
    status, resp, text = server.request("GET", "/metrics")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in VLLM_METRICS:
        assert name in families, name
        assert all(s.labels["model_name"] == "opt-tiny" for s in families[name].samples), name
    samples = parse_metrics(text)
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:request_prefill_time_seconds_count",
                 "vllm:request_decode_time_seconds_count"):
        assert samples[name][0][1] >= 1, name
    assert samples["vllm:inter_token_latency_seconds_count"][0][1] >= 2
    assert metric(server, "vllm:request_success_total", finished_reason="length") >= 1
    assert metric(server, "vllm:generation_tokens_total") >= 3
    assert metric(server, "vllm:kv_cache_usage_perc") == 0   # idle: every block free
    assert {s[0]["instance"]: s[1] for s in samples["dsjax_kv_blocks_total"]} == \
        {"prefill0": 256.0, "decode0": 256.0}
    for name in ("dsjax_requests_waiting", "dsjax_requests_running", "dsjax_requests_swapped",
                 "dsjax_requests_held", "dsjax_kv_blocks_used", "dsjax_migrations_total",
                 "dsjax_migration_seconds_total", "dsjax_migration_bytes_total",
                 "dsjax_admission_queue_length", "dsjax_admission_rejections_total"):
        assert name in samples, name
    assert metric(server, "dsjax_http_errors_total", status="400") >= 1
    assert metric(server, "dsjax_migrations_total", instance="decode0") >= 1
    assert metric(server, "dsjax_migration_bytes_total", instance="decode0") > 0


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
