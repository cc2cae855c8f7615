"""What OpenAI and vLLM clients expect: chat completions through the model's chat template,
batched prompts, model cards, vLLM's error shape; checked with the official `openai` client,
LiteLLM, and transformers' own template renderer as the reference.

The engine's tokenizer directory is one the tests write: a tokenizer_config.json holding a chat
template (no tokenizer files, so text goes through the GPT-2 BPE fallback, as opt-tiny's does).
"""
from __future__ import annotations

import dataclasses
import json
import os

import openai
import pytest

from serving.chat_template import load_chat_template
from tests._server_helpers import (EngineProxy, ServerLoop, engine_tokens, parse_metrics,
                                   tiny_engine)

# A ChatML-like template using what Hub templates use: loop controls, namespace, tojson,
# raise_exception.
TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- continue -%}{%- endif -%}
{%- if (m['role'] == 'user') != (loop.index0 % 2 == (1 if ns.system else 0)) -%}
{{ raise_exception('roles must alternate user/assistant') }}
{%- endif -%}
<|{{ m['role'] }}|>{{ m['content'] }}
{% endfor -%}
{%- if ns.system %}<|meta|>{{ {'system': ns.system} | tojson }}
{% endif -%}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}"""
OTHER_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}A:"

MESSAGES = [{"role": "system", "content": "Be brief & <polite>."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def loop(tokenizer_dir):
    engine = tiny_engine(tokenizer=str(tokenizer_dir))
    loop = ServerLoop(engine)
    yield loop
    loop.close()
    engine.shutdown()


@pytest.fixture(scope="module")
def server(loop):
    return loop.serve()


def reference_prompt(messages, template=TEMPLATE) -> str:
    """transformers' rendering: what the same template gives under transformers."""
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template([messages], chat_template=template,
                                        add_generation_prompt=True, bos_token="</s>",
                                        eos_token="</s>")
    return rendered[0]


def expected_chat(server, messages, max_tokens, template=TEMPLATE) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy output ids): the template's text tokenized without BOS, as vLLM."""
    ids = server.engine.tokenizer.encode(reference_prompt(messages, template), add_bos=False)
    return ids, engine_tokens(server.engine, ids, temperature=0.0, max_tokens=max_tokens,
                              ignore_eos=True)


def client_of(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused")


def test_the_template_renders_as_under_transformers():
    assert load_chat_template(TEMPLATE, None).render(MESSAGES) == reference_prompt(MESSAGES)
    assert '<|meta|>{"system": "Be brief & <polite>."}' in reference_prompt(MESSAGES)


def test_where_templates_come_from(tmp_path):
    assert load_chat_template(None, tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": {"content": "<s>"}, "chat_template": [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "{{ bos_token }}D"}]}))
    assert load_chat_template(None, tmp_path).render(MESSAGES) == "<s>D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(None, tmp_path).render(MESSAGES) == "J"
    assert load_chat_template("{{ eos_token }}F", tmp_path).render(MESSAGES) == "</s>F"
    for option, message in (("/no/such/file", "no such file"), ("{% if %}", "does not compile")):
        with pytest.raises(ValueError, match=message):
            load_chat_template(option, None)


def test_chat_with_the_openai_client(server):
    ids, expected = expected_chat(server, MESSAGES, 6)
    text = server.engine.tokenizer.decode(expected)
    done = client_of(server).chat.completions.create(
        model="opt-tiny", messages=MESSAGES, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True})
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == text
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), 6)


def test_chat_streams_role_then_deltas_and_usage_only_when_asked(server):
    ids, expected = expected_chat(server, MESSAGES, 5)
    client = client_of(server)
    args = dict(model="opt-tiny", messages=MESSAGES, max_tokens=5, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(**args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        server.engine.tokenizer.decode(expected)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 5 + ["length"]

    chunks = list(client.chat.completions.create(**args, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + 5

    # vLLM's continuous_usage_stats (guidellm asks for it): usage so far in every chunk.
    chunks = list(client.chat.completions.create(**args, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    assert [c.usage.completion_tokens for c in chunks] == [0, 1, 2, 3, 4, 5, 5]
    assert {c.usage.prompt_tokens for c in chunks} == {len(ids)}


def test_chat_logprobs(server):
    ids, expected = expected_chat(server, MESSAGES, 3)
    done = client_of(server).chat.completions.create(
        model="opt-tiny", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True})
    content = done.choices[0].logprobs.content
    assert [c.token for c in content] == [server.engine.tokenizer.decode([t]) for t in expected]
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.logprob
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_litellm_chat_completion(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")   # no network fetch
    import litellm

    _, expected = expected_chat(server, MESSAGES, 4)
    answer = litellm.completion(model="openai/opt-tiny", api_base=f"{server.base_url}/v1",
                                api_key="unused", messages=MESSAGES, max_tokens=4,
                                temperature=0, ignore_eos=True)
    assert answer.choices[0].message.content == server.engine.tokenizer.decode(expected)
    assert answer.usage.completion_tokens == 4


def test_template_from_the_flag_file_or_inline(loop, server, tmp_path):
    path = tmp_path / "other.jinja"
    path.write_text(OTHER_TEMPLATE)
    messages = [{"role": "user", "content": "Hello"}]
    ids, expected = expected_chat(server, messages, 3, OTHER_TEMPLATE)
    for option in (str(path), OTHER_TEMPLATE):
        flagged = loop.serve(chat_template=option)
        done = client_of(flagged).chat.completions.create(
            model="opt-tiny", messages=messages, max_tokens=3, temperature=0,
            extra_body={"ignore_eos": True})
        assert done.usage.prompt_tokens == len(ids)
        assert done.choices[0].message.content == server.engine.tokenizer.decode(expected)


def test_no_chat_template_is_a_clear_400(loop, server):
    plain = loop.serve(EngineProxy(server.engine, config=dataclasses.replace(
        server.engine.config, tokenizer=None)))
    with pytest.raises(openai.BadRequestError) as caught:
        client_of(plain).chat.completions.create(model="opt-tiny", messages=MESSAGES)
    assert "--chat-template" in caught.value.message


BAD_CHAT = [
    ({"messages": MESSAGES[1:] * 2}, "roles must alternate", "messages"),
    ({"messages": []}, "'messages' is empty", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "reads text only", "messages"),
    ({"messages": MESSAGES, "n": 0}, "'n' is 0", "n"),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tool", "tools"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format",
     "response_format"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "needs logprobs=true", "top_logprobs"),
    ({"messages": MESSAGES, "max_tokens": 5000}, "max_model_len", "max_tokens"),
]


@pytest.mark.parametrize("body,message,param", BAD_CHAT, ids=[m for _, m, _ in BAD_CHAT])
def test_bad_chat_requests_are_400_naming_the_field(server, body, message, param):
    status, _, answer = server.post("/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and message in answer["error"]["message"]


def test_batched_prompts_give_one_choice_per_prompt_in_order(server):
    prompts = ["The capital of France is", "Hello", [2, 100, 200, 300]]
    expected = [engine_tokens(server.engine, p, temperature=0.0, max_tokens=4, ignore_eos=True)
                for p in prompts]
    texts = [server.engine.tokenizer.decode(e) for e in expected]
    client = client_of(server)
    args = dict(model="opt-tiny", prompt=prompts, max_tokens=4, temperature=0,
                extra_body={"ignore_eos": True})
    done = client.completions.create(**args)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert [c.text for c in done.choices] == texts
    prompt_tokens = sum(len(server.engine.tokenizer.encode(p)) if isinstance(p, str) else len(p)
                        for p in prompts)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, 12)

    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = ["", "", ""]
    for chunk in chunks[:-1]:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == texts
    assert chunks[-1].usage.completion_tokens == 12


def test_model_cards_and_served_model_names(loop, server):
    named = loop.serve(served_model_names=["tiny-chat", "org/tiny"])
    client = client_of(named)
    assert [m.id for m in client.models.list().data] == ["tiny-chat", "org/tiny"]
    card = client.models.retrieve("org/tiny")
    assert (card.id, card.root, card.max_model_len) == ("org/tiny", "opt-tiny", 2048)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("opt-tiny")
    status, _, answer = named.request("GET", "/v1/models/gpt-4")
    assert status == 404 and answer["error"] == {
        "message": answer["error"]["message"], "type": "NotFoundError", "param": "model",
        "code": 404}
    done = client.completions.create(model="org/tiny", prompt="Hi", max_tokens=1)
    assert done.model == "org/tiny"
    samples = parse_metrics(named.request("GET", "/metrics")[2])
    assert {s[0]["model_name"] for s in samples["vllm:request_success_total"]} == {"tiny-chat"}


def test_tokenize_and_detokenize_as_vllm_answers_them(server):
    """vLLM's /tokenize (a prompt, or a chat through the template) and /detokenize."""
    text = "The capital of France"
    status, _, answer = server.post("/tokenize", {"model": "opt-tiny", "prompt": text})
    plain = server.engine.tokenizer.encode(text, add_bos=False)
    assert status == 200 and answer == {"count": len(plain) + 1, "max_model_len": 2048,
                                        "tokens": [2, *plain], "token_strs": None}
    answer = server.post("/tokenize", {"prompt": text, "add_special_tokens": False,
                                       "return_token_strs": True})[2]
    assert answer["tokens"] == plain and "".join(answer["token_strs"]) == \
        "TheĠcapitalĠofĠFrance"    # GPT-2's byte-level spelling of the spaces
    assert server.post("/detokenize", {"tokens": plain})[2] == {"prompt": text}
    # BOS spelled as OPT's tokenizer spells it; "messages": null is a prompt request (vLLM).
    answer = server.post("/tokenize", {"prompt": text, "messages": None,
                                       "return_token_strs": True})[2]
    assert answer["tokens"] == [2, *plain] and answer["token_strs"][0] == "</s>"
    # Well-known GPT-2 ids and spellings (opt-tiny has no tokenizer files: the GPT-2 BPE).
    answer = server.post("/tokenize", {"prompt": "Hello world", "return_token_strs": True})[2]
    assert (answer["tokens"], answer["token_strs"]) == ([2, 15496, 995],
                                                        ["</s>", "Hello", "Ġworld"])
    assert server.post("/detokenize", {"tokens": [50256, 15496, 995]})[2] == {
        "prompt": "<|endoftext|>Hello world"}    # special tokens spelled out, as vLLM

    # A chat counts what /v1/chat/completions will send: transformers' rendering, no BOS.
    chat = server.post("/tokenize", {"messages": MESSAGES, "add_generation_prompt": True})[2]
    ids = server.engine.tokenizer.encode(reference_prompt(MESSAGES), add_bos=False)
    assert chat["tokens"] == ids
    done = client_of(server).chat.completions.create(model="opt-tiny", messages=MESSAGES,
                                                     max_tokens=1)
    assert done.usage.prompt_tokens == chat["count"]


@pytest.mark.parametrize("path,body,status,message", [
    ("/tokenize", {}, 400, "send field 'prompt' (text) or 'messages' (a chat)"),
    ("/tokenize", {"prompt": [1, 2]}, 400, "field 'prompt' must be a string"),
    ("/tokenize", {"prompt": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
    ("/tokenize", {"messages": []}, 400, "field 'messages' is empty"),
    ("/detokenize", {}, 400, "field 'tokens' is required"),
    ("/detokenize", {"tokens": [5, -1]}, 400, "field 'tokens' is -1: it must be >= 0"),
    ("/detokenize", {"tokens": [5, 10**6]}, 400,
     "token id 1000000 is outside the model's vocabulary of"),
    ("/detokenize", {"tokens": "hi"}, 400, "field 'tokens' must be a list of integers"),
])
def test_bad_tokenize_requests_name_the_problem(server, path, body, status, message):
    got, _, answer = server.post(path, body)
    assert got == status and message in answer["error"]["message"], answer
    assert server.post("/tokenize", {"prompt": "hi"})[0] == 200


def engine_output(engine, prompt, **params):
    from dsjax import SamplingParams
    return engine.add_request(prompt, SamplingParams(**params), stream=False).result(timeout=120)


def test_n_and_best_of_with_the_openai_client(server):
    """n sequences per prompt (choice i * n + j is sequence j of prompt i), as the engine
    samples them from one prefill; best_of keeps the n most likely."""
    prompts = ["The capital of France is", [2, 100, 200, 300]]
    params = dict(temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    client = client_of(server)
    done = client.completions.create(model="opt-tiny", prompt=prompts, n=2, max_tokens=5,
                                     temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    expected = [engine_output(server.engine, server.engine.tokenizer.encode(p)
                              if isinstance(p, str) else p, n=2, **params) for p in prompts]
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert [c.text for c in done.choices] == [s.text for e in expected for s in e.outputs]
    assert done.usage.completion_tokens == 20
    best = client.completions.create(model="opt-tiny", prompt=prompts[1], n=1, best_of=3,
                                     max_tokens=5, temperature=1.0, seed=7,
                                     extra_body={"ignore_eos": True})
    every = engine_output(server.engine, prompts[1], n=3, **params)
    most_likely = max(every.outputs, key=lambda s: s.cumulative_logprob)
    assert best.choices[0].text == most_likely.text
    chat = client.chat.completions.create(model="opt-tiny", messages=MESSAGES, n=3,
                                          max_tokens=4, temperature=1.0, seed=1,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) > 1


def test_echo_returns_the_prompt_and_its_logprobs(server):
    prompt = [2, 100, 200, 300]
    done = client_of(server).completions.create(
        model="opt-tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=2, temperature=0,
        extra_body={"ignore_eos": True})
    reference = engine_output(server.engine, prompt, temperature=0, max_tokens=2,
                              ignore_eos=True, logprobs=1, prompt_logprobs=1)
    tokenizer = server.engine.tokenizer
    choice = done.choices[0]
    assert choice.text == tokenizer.decode(prompt) + reference.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 2 and lp.token_logprobs[0] is None
    expected = [reference.prompt_logprobs[i][t] for i, t in enumerate(prompt) if i] + \
        [reference.logprobs[i][t] for i, t in enumerate(reference.token_ids)]
    assert lp.token_logprobs[1:] == pytest.approx(expected)


def test_penalties_and_logit_bias_with_the_openai_client(server):
    client = client_of(server)
    prompt = [2, 100, 200, 300]
    forced = client.completions.create(model="opt-tiny", prompt=prompt, max_tokens=4,
                                       temperature=0, logit_bias={"4000": 100},
                                       extra_body={"ignore_eos": True})
    assert forced.choices[0].text == server.engine.tokenizer.decode([4000] * 4)
    penalised = client.completions.create(
        model="opt-tiny", prompt=prompt, max_tokens=6, temperature=0, presence_penalty=1.5,
        frequency_penalty=0.5, extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    reference = engine_output(server.engine, prompt, temperature=0, max_tokens=6,
                              ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5,
                              repetition_penalty=1.3)
    plain = engine_output(server.engine, prompt, temperature=0, max_tokens=6, ignore_eos=True)
    assert penalised.choices[0].text == reference.text != plain.text
