"""Answers with several sequences over real sockets: /generate streams that end, echo offsets per
choice, chat's best_of (repros t3_generate_stream_n2.py and t11_http.py of issue 18)."""
from __future__ import annotations

import itertools
import json

import pytest

from dsjax.sampling_params import SamplingParams

PROMPT_IDS = [2, 100, 200, 300]
SAMPLED = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}A:"


@pytest.fixture(scope="module")
def server(loop):
    return loop.serve(chat_template=CHAT_TEMPLATE)


def sequences(engine, prompt, **params) -> list[list[int]]:
    final = engine.add_request(prompt, SamplingParams(**params), stream=False).result(120)
    return [s.token_ids for s in final.outputs]


def early_stop(engine) -> tuple[int, int]:
    """(seed, stop token id) such that sequence 1 of n=2 meets the stop token at its third
    token while sequence 0 never does: sequence 1 ends first."""
    for seed in itertools.count():
        first, second = sequences(engine, PROMPT_IDS, n=2, seed=seed, **SAMPLED)
        token = second[2]
        if token not in first and token not in second[:2]:
            return seed, token
        assert seed < 50, "no seed makes sequence 1 end first"


def test_generate_stream_with_n2_ends_with_finished_when_sequence_1_ends_first(server):
    seed, stop = early_stop(server.engine)
    conn, resp = server.open_stream("/generate", {"prompt": PROMPT_IDS, "n": 2, "seed": seed,
                                                  "stop_token_ids": [stop], "stream": True,
                                                  **SAMPLED})
    records = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    conn.close()
    assert [r["finished"] for r in records] == [False] * (len(records) - 1) + [True]
    last = records[-1]
    assert last["index"] == 0 and last["finish_reason"] == "length" and last["lifetime_events"]
    ended = [r for r in records if r.get("finish_reason")]
    assert [(r["index"], r["finish_reason"]) for r in ended] == [(1, "stop"), (0, "length")]
    assert [r["token_id"] for r in records if r["index"] == 1][-1] == stop


def test_echo_text_offsets_count_from_each_choices_own_prompt(server):
    status, _, body = server.post("/v1/completions", {
        "prompt": "Hello there", "n": 2, "max_tokens": 3, "echo": True, "logprobs": 1,
        "seed": 3, "temperature": 1})
    assert status == 200, body
    for choice in body["choices"]:
        lp = choice["logprobs"]
        lengths = [len(t) for t in lp["tokens"]]
        assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))], \
            choice["index"]
        assert choice["text"].startswith("Hello there")


def test_chat_honours_best_of(server):
    """best_of > n keeps the n most likely of best_of sequences, as /v1/completions does."""
    messages = [{"role": "user", "content": "Hi"}]
    body = {"messages": messages, "n": 1, "best_of": 3, "max_tokens": 4, "temperature": 1.0,
            "seed": 5, "ignore_eos": True}
    status, _, answer = server.post("/v1/chat/completions", body)
    assert status == 200, answer
    ids = server.engine.tokenizer.encode("Hi\nA:", add_bos=False)
    every = server.engine.add_request(ids, SamplingParams(n=3, temperature=1.0, seed=5,
                                                          max_tokens=4, ignore_eos=True),
                                      stream=False).result(120)
    best = max(every.outputs, key=lambda s: s.cumulative_logprob)
    assert [c["message"]["content"] for c in answer["choices"]] == [best.text]
    status, _, answer = server.post("/v1/chat/completions", {**body, "stream": True})
    assert status == 400 and answer["error"]["param"] == "best_of"
