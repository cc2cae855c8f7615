"""`python -m serving --model <a LLaMA directory>` serves the official openai client, chat
included, through the directory's own tokenizer and chat template; answers equal
transformers' greedy tokens on the same checkpoint."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests._hf_helpers import make_hf_family, save_safetensors
from tests._tokenizer_helpers import make_tokenizer_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = make_hf_family("llama", seed=5)
    path = save_safetensors(model, tmp_path_factory.mktemp("llama-served") / "llama")
    make_tokenizer_dir(path, "bytelevel")
    return model, path


@pytest.fixture(scope="module")
def server(llama_dir):
    _, path = llama_dir
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model", str(path), "--dtype", "float32",
         "--port", "0", "--skip-warmup", "--num-blocks", "64"],
        stderr=subprocess.PIPE, text=True, env=env)
    port, deadline, seen = None, time.monotonic() + 300, []
    while port is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        port = int(match.group(1)) if match else None
    assert port, "server did not start:\n" + "".join(seen[-30:])
    yield f"http://127.0.0.1:{port}/v1"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def hf_greedy_text(model, tokenizer, ids, n):
    # An explicit mask: generate() would take the BOS (id 0 here) for padding otherwise.
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


def test_openai_client_completions_and_chat_through_the_directorys_template(llama_dir, server):
    import openai
    from transformers import AutoTokenizer

    model, path = llama_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    client = openai.OpenAI(base_url=server, api_key="none")
    prompt = "def f(x):\n    return"
    done = client.completions.create(model=str(path), prompt=prompt, max_tokens=8,
                                     temperature=0, extra_body={"ignore_eos": True})
    want = hf_greedy_text(model, tokenizer, tokenizer(prompt).input_ids, 8)
    assert done.choices[0].text == tokenizer.decode(want)
    assert done.usage.prompt_tokens == len(tokenizer(prompt).input_ids)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=str(path), messages=messages, max_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids   # the template wrote the BOS
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == tokenizer.decode(hf_greedy_text(model, tokenizer,
                                                                              ids, 6))
    with pytest.raises(openai.BadRequestError, match="roles must be user or assistant"):
        client.chat.completions.create(model=str(path), max_tokens=2,
                                       messages=[{"role": "tool", "content": "x"}])


def hf_logprobs(model, tokenizer, ids, n):
    """transformers' greedy continuation of ids, and the log-softmax over the vocabulary at
    each of its tokens' positions."""
    tokens = hf_greedy_text(model, tokenizer, ids, n)
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
    return tokens, torch.log_softmax(logits.double(), -1)


def test_streamed_logprobs_are_each_tokens_own(llama_dir, server):
    """Streamed with logprobs, every chunk of a completion and of a chat carries its own
    token's log-probability and its top-2 alternatives: transformers' log-softmax at that
    position (the server reads them from the sequence's growing history in place)."""
    import openai
    from transformers import AutoTokenizer

    model, path = llama_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    client = openai.OpenAI(base_url=server, api_key="none")
    close = dict(rel=1e-3, abs=1e-3)

    prompt = "def f(x):\n    return"
    tokens, want = hf_logprobs(model, tokenizer, tokenizer(prompt).input_ids, 6)
    chunks = [c.choices[0].logprobs for c in client.completions.create(
        model=str(path), prompt=prompt, logprobs=2, max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [len(c.token_logprobs) for c in chunks] == [1] * 6
    assert [c.token_logprobs[0] for c in chunks] == pytest.approx(
        [float(want[i, t]) for i, t in enumerate(tokens)], **close)
    for chunk, row in zip(chunks, want):
        # Keyed by token text: two ids of one text (bytes of a split character) are one key,
        # which keeps one of their values.
        top = row.topk(2).values.tolist()
        got = sorted(chunk.top_logprobs[0].values(), reverse=True)
        assert got == pytest.approx(top, **close) or (
            len(got) == 1 and got[0] in [pytest.approx(t, **close) for t in top])

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens, want = hf_logprobs(model, tokenizer,
                               tokenizer(text, add_special_tokens=False).input_ids, 4)
    content = [c.choices[0].logprobs.content[0] for c in client.chat.completions.create(
        model=str(path), messages=messages, max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
        if c.choices and c.choices[0].logprobs]
    assert [c.logprob for c in content] == pytest.approx(
        [float(want[i, t]) for i, t in enumerate(tokens)], **close)
    for entry, row in zip(content, want):
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            row.topk(2).values.tolist(), **close)
