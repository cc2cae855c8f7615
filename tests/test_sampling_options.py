"""n / best_of (one prefill, pages shared copy-on-write), echo (prompt logprobs), penalties and
logit_bias: each checked against transformers' logits or NumPy in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsjax import SamplingParams
from tests._engine_helpers import hf_engine, shutdown_all, wait_idle
from tests._hf_helpers import hf_greedy
from tests.conftest import engine_prompts

MODES = {"disaggregated": {}, "colocated": dict(mode="colocated"),
         "chunked": dict(mode="chunked", decoding_max_tokens_per_batch=16)}


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


def hf_log_probs(model, ids: list[int]) -> np.ndarray:
    """transformers' log-softmax at every position of `ids`, float64: [len(ids), vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def assert_teacher_forced(model, prompt, tokens, logprobs, tol=2e-4):
    """Each generated token's reported log-probability equals transformers' given the prompt
    and that sequence's own earlier tokens: its KV was nobody else's."""
    ref = hf_log_probs(model, list(prompt) + list(tokens))
    for i, (token, table) in enumerate(zip(tokens, logprobs)):
        assert table[token] == pytest.approx(ref[len(prompt) - 1 + i, token], abs=tol)


@pytest.mark.parametrize("mode", list(MODES))
def test_n_sequences_share_the_prompt_and_each_is_exact(mode, hf_opt):
    """Four sampled sequences from one prefill (a 17-token prompt: its last page is shared and
    must be copied before each sequence writes into it)."""
    engine = hf_engine(hf_opt[1], **MODES[mode])
    prompt = engine_prompts()[1]
    out = engine.add_request(prompt, SamplingParams(
        n=4, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True, logprobs=0),
        stream=False).result(timeout=300)
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "sequences did not diverge"
    for o in out.outputs:
        assert len(o.token_ids) == 10 and o.finish_reason == "length"
        assert_teacher_forced(hf_opt[0], prompt, o.token_ids, o.logprobs)
    assert out.token_ids == out.outputs[0].token_ids
    wait_idle(engine)


def test_greedy_n_gives_n_copies_of_transformers_greedy(hf_opt):
    engine = hf_engine(hf_opt[1])
    prompt = engine_prompts()[0]
    out = engine.add_request(prompt, SamplingParams(n=3, temperature=0, max_tokens=8,
                                                    ignore_eos=True)).result(timeout=300)
    assert [o.token_ids for o in out.outputs] == [hf_greedy(hf_opt[0], prompt, 8)] * 3
    wait_idle(engine)


def test_best_of_returns_the_n_most_likely(hf_opt):
    engine = hf_engine(hf_opt[1])
    prompt = engine_prompts()[2]
    params = SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=8,
                            ignore_eos=True, logprobs=0)
    out = engine.add_request(prompt, params, stream=False).result(timeout=300)
    every = engine.add_request(prompt, SamplingParams(
        n=5, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=0),
        stream=False).result(timeout=300)
    # Cumulative log-probabilities recomputed from transformers rank the five sequences.
    ranked = sorted(every.outputs, key=lambda o: -sum(
        hf_log_probs(hf_opt[0], prompt + o.token_ids)[len(prompt) - 1 + i, t]
        for i, t in enumerate(o.token_ids)))
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ranked[:2]]
    with pytest.raises(ValueError, match="cannot be streamed"):
        engine.add_request(prompt, params, stream=True)
    wait_idle(engine)


def test_n_under_memory_pressure_swaps_shared_pages_correctly(hf_opt):
    """24 pages of 4 tokens for 4 sequences of up to 57 tokens: sequences that share pages are
    swapped out and back; every token stays exact."""
    engine = hf_engine(hf_opt[1], num_blocks=24)
    prompt = engine_prompts()[1]
    out = engine.add_request(prompt, SamplingParams(
        n=4, temperature=1.0, seed=2, max_tokens=40, ignore_eos=True, logprobs=0),
        stream=False).result(timeout=300)
    for o in out.outputs:
        assert_teacher_forced(hf_opt[0], prompt, o.token_ids, o.logprobs)
    assert sum(s["num_preemptions"] for s in engine.stats()) > 0
    wait_idle(engine)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_prompt_logprobs_are_transformers(mode, hf_opt):
    engine = hf_engine(hf_opt[1], **MODES[mode])
    prompt = engine_prompts()[3]
    out = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2,
                                                    prompt_logprobs=3)).result(timeout=300)
    ref = hf_log_probs(hf_opt[0], prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, table in enumerate(out.prompt_logprobs[1:]):
        top = set(np.argsort(-ref[i])[:3].tolist()) | {prompt[i + 1]}
        assert set(table) == top
        for t, lp in table.items():
            assert lp == pytest.approx(ref[i, t], abs=2e-4)
    wait_idle(engine)


def test_repetition_penalty_matches_transformers(hf_opt):
    """transformers' RepetitionPenaltyLogitsProcessor is vLLM's repetition penalty."""
    engine = hf_engine(hf_opt[1])
    for prompt in engine_prompts()[:3]:
        with torch.no_grad():
            ref = hf_opt[0].generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                                     do_sample=False, repetition_penalty=1.8, pad_token_id=1)
        out = engine.add_request(prompt, SamplingParams(
            temperature=0, max_tokens=10, ignore_eos=True,
            repetition_penalty=1.8)).result(timeout=300)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    wait_idle(engine)


def test_a_penalised_row_among_plain_rows_runs_in_the_batched_step(hf_opt):
    """Repro t9_penalty_mix (../shared/repros): one repetition-penalised request among plain
    ones made every batched decode step raise and re-run each row alone. Now no step fails,
    and every request gives transformers' tokens (greedy, or with its penalty)."""
    engine = hf_engine(hf_opt[1])
    decode = engine.local_worker("decode0")
    failures = []
    dispatch = decode.runner.dispatch_decode

    def counting(rows, previous=None):
        try:
            return dispatch(rows, previous)
        except Exception as e:
            failures.append(e)
            raise
    decode.runner.dispatch_decode = counting
    try:
        prompts = engine_prompts()[:4]
        plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        penalised = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                   repetition_penalty=1.8)
        streams = [engine.add_request(p, plain) for p in prompts[1:]]
        odd = engine.add_request(prompts[0], penalised)
        outs = [s.result(timeout=300) for s in streams]
        with torch.no_grad():
            ref = hf_opt[0].generate(torch.tensor([prompts[0]]), max_new_tokens=10,
                                     min_new_tokens=10, do_sample=False,
                                     repetition_penalty=1.8, pad_token_id=1)
        assert odd.result(timeout=300).token_ids == ref[0, len(prompts[0]):].tolist()
        assert [o.token_ids for o in outs] == [hf_greedy(hf_opt[0], p, 10) for p in prompts[1:]]
    finally:
        decode.runner.dispatch_decode = dispatch
    assert failures == []
    wait_idle(engine)


def numpy_penalised_greedy(model, prompt, n, presence, frequency, bias):
    """Greedy decoding on transformers' logits with vLLM's definitions, in float64: logit_bias
    added, then frequency x count and presence x [count > 0] subtracted for output tokens."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        for t, b in bias.items():
            logits[t] += b
        counts = np.bincount(ids[len(prompt):], minlength=logits.size)
        logits -= frequency * counts + presence * (counts > 0)
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt):]


@pytest.mark.parametrize("mode", ["disaggregated", "chunked"])
def test_presence_frequency_and_logit_bias_match_numpy(mode, hf_opt):
    engine = hf_engine(hf_opt[1], **MODES[mode])
    prompt = engine_prompts()[4]
    bias = {7: 4.0, 700: -50.0}
    expected = numpy_penalised_greedy(hf_opt[0], prompt, 12, 1.5, 0.7, bias)
    assert 7 in expected, "the bias should make token 7 appear"
    out = engine.add_request(prompt, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=1.5,
        frequency_penalty=0.7, logit_bias=bias)).result(timeout=300)
    assert out.token_ids == expected
    wait_idle(engine)


def test_invalid_options_name_the_field():
    for kwargs, field in [(dict(n=0), "n"), (dict(n=3, best_of=2), "best_of"),
                          (dict(presence_penalty=3.0), "presence_penalty"),
                          (dict(repetition_penalty=0.0), "repetition_penalty"),
                          (dict(logit_bias={5: 101.0}), "logit_bias"),
                          (dict(temperature=float("nan")), "temperature"),
                          (dict(prompt_logprobs=21), "prompt_logprobs")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
