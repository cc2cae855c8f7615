"""Automatic prefix caching, in every mode and under disaggregation, against transformers.

A prompt starts from the longest cached prefix of full blocks (same tokens, same cache_salt);
at least its last token is computed. A decode instance pulls only the blocks its own cache
lacks. Requests asking for prompt_logprobs take no cached prefix (every prompt token's
log-probability is computed), so their answers are unchanged by caching.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dsjax import SamplingParams
from dsjax.engine.block_manager import BlockManager, block_hashes
from tests._engine_helpers import get_engine, hf_engine, shutdown_all, wait_idle
from tests._hf_helpers import hf_greedy, make_hf_family, save_safetensors

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


# ---------------------------------------------------------------- block manager (pure Python)

def test_hashes_chain_salt_and_are_stable_across_processes():
    ids = list(range(3, 40))
    here = block_hashes(ids, 4)
    assert len(here) == 9 and len(set(here)) == 9
    assert block_hashes(ids[:8] + [999] + ids[9:], 4)[:2] == here[:2]   # a chain: the
    assert block_hashes(ids[:8] + [999] + ids[9:], 4)[2:] != here[2:]   # rest all change
    assert block_hashes(ids, 4, salt="tenant-a") != here
    code = ("from dsjax.engine.block_manager import block_hashes; "
            f"print([h.hex() for h in block_hashes({ids}, 4)])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert other.stdout.strip() == str([h.hex() for h in here])


def test_cached_blocks_are_shared_refcounted_and_evicted_tail_first():
    bm = BlockManager(6, block_size=4, enable_prefix_caching=True)
    a = list(range(10, 22))                       # 3 full blocks
    bm.allocate("a", len(a))
    bm.register("a", a)
    assert bm.cached_prefix(a, limit=len(a) - 1) == bm.tables["a"][:2]
    hits = bm.cached_prefix(a + [7, 8], limit=13)
    assert hits == bm.tables["a"]
    assert bm.cost(hits, 14) == 1                  # only the 4th block is new
    bm.allocate("b", 14, cached=hits)
    assert bm.device.refs[hits[0]] == 2 and bm.num_used == 4
    bm.free("a")
    bm.free("b")
    assert bm.num_used == 0 and bm.num_cached == 3 and bm.num_free == 6
    # Cached blocks wait; the tail of a sequence is evicted before its head.
    bm.allocate("c", 16)                          # 3 free blocks + one cached: the tail
    assert bm.num_cached == 2
    assert bm.cached_prefix(a, limit=11) == hits[:2]   # the head survived
    assert bm.cached_prefix(a, salt="other") == []      # another salt shares nothing
    bm.free("c")
    assert bm.num_used == 0


# ---------------------------------------------------------------- engines vs transformers

def conversation(rng, turns: int, vocab: int = 1000):
    """A multi-turn chat as token ids: a shared system prompt, then user turns; each turn's
    prompt is the whole history (the last answer included), as chat clients resend it."""
    system = rng.integers(4, vocab, 21).tolist()       # not a multiple of the block size
    return system, [rng.integers(4, vocab, int(n)).tolist() for n in rng.integers(3, 9, turns)]


def run_conversation(engine, reference_model, system, user_turns):
    history, cached = list(system), []
    for user in user_turns:
        history += user
        out = engine.add_request(history, GREEDY).result(timeout=300)
        assert out.token_ids == hf_greedy(reference_model, history, GREEDY.max_tokens)
        cached.append(out.num_cached_tokens)
        history += out.token_ids
    return cached


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = make_hf_family("llama", seed=11)
    return model, save_safetensors(model, tmp_path_factory.mktemp("prefix") / "llama")


MODES = {"disaggregated": {}, "colocated": dict(mode="colocated"),
         "chunked": dict(mode="chunked", decoding_max_tokens_per_batch=16)}


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("mode", list(MODES))
def test_multi_turn_conversation_reuses_its_history(mode, family, hf_opt, llama):
    model, path = hf_opt if family == "opt" else llama
    engine = hf_engine(path, **MODES[mode], num_blocks=64)
    rng = np.random.default_rng(hash((mode, family)) & 0xFFFF)
    system, turns = conversation(rng, 3)
    cached = run_conversation(engine, model, system, turns)
    # Every turn after the first starts from the blocks of the turn before (block size 4).
    assert cached[0] == 0 and all(c >= 4 * ((len(system) + 3) // 4) - 4 for c in cached[1:])
    stats = engine.stats()
    assert sum(s.get("prefix_cache_hits", 0) for s in stats) >= sum(cached)
    if mode == "disaggregated":
        decode = next(s for s in stats if s["role"] == "decode")
        assert decode["migration_blocks_skipped"] > 0, "decode pulled blocks it held"
    wait_idle(engine)


def test_shared_system_prompt_with_n_and_prompt_logprobs(hf_opt):
    """Concurrent requests sharing a prefix, n > 1 forks of a cached prefix, and a request
    with prompt_logprobs (computes its whole prompt: its log-probabilities stay complete)."""
    model, path = hf_opt
    engine = hf_engine(path, num_blocks=64)
    rng = np.random.default_rng(5)
    system = rng.integers(4, 1000, 24).tolist()
    first = system + [7, 8, 9]
    engine.add_request(first, GREEDY).result(timeout=300)      # caches the system prompt
    prompts = [system + rng.integers(4, 1000, int(n)).tolist() for n in (2, 5, 9)]
    streams = [engine.add_request(p, GREEDY) for p in prompts]
    n3 = engine.add_request(prompts[0], SamplingParams(n=3, temperature=0, max_tokens=6,
                                                       ignore_eos=True))
    scored = engine.add_request(first, SamplingParams(temperature=0, max_tokens=4,
                                                      ignore_eos=True, prompt_logprobs=1))
    for p, s in zip(prompts, streams):
        out = s.result(timeout=300)
        assert out.token_ids == hf_greedy(model, p, GREEDY.max_tokens)
        assert out.num_cached_tokens >= 20
    out = n3.result(timeout=300)
    assert all(o.token_ids == hf_greedy(model, prompts[0], 6) for o in out.outputs)
    out = scored.result(timeout=300)
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(first)
    assert out.token_ids == hf_greedy(model, first, 4)
    wait_idle(engine)


def test_eviction_under_memory_pressure_and_aborts_stay_exact(hf_opt):
    """A pool too small to keep every conversation's history: cached blocks are evicted and
    recomputed, aborted requests give their references back, answers stay transformers'."""
    model, path = hf_opt
    engine = hf_engine(path, mode="colocated", num_blocks=28)
    rng = np.random.default_rng(9)
    convs = [conversation(rng, 2) for _ in range(3)]
    for system, turns in convs:
        run_conversation(engine, model, system, turns[:1])
    for system, turns in convs:                            # the early ones were evicted
        long = engine.add_request(system + turns[0] + [5] * 30, SamplingParams(
            temperature=0, max_tokens=40, ignore_eos=True))
        engine.abort(long.request_id)
        run_conversation(engine, model, system, turns)
    wait_idle(engine)
    stats = engine.stats()[0]
    assert stats["blocks_used"] == 0 and 0 < stats["blocks_cached"] <= 28


def test_no_reference_leaks_after_many_mixed_requests_with_aborts():
    """400 requests over a few shared prefixes, a quarter aborted at random points: afterwards
    every block is free or cached and unreferenced."""
    engine = get_engine(num_blocks=96, max_num_blocks_per_req=32)
    rng = np.random.default_rng(1)
    bases = [rng.integers(4, 1000, int(n)).tolist() for n in (13, 30, 45)]
    streams = []
    for i in range(400):
        prompt = bases[i % 3][:int(rng.integers(5, 45))] + rng.integers(4, 1000, 3).tolist()
        params = SamplingParams(temperature=float(rng.choice([0, 1])), ignore_eos=True,
                                max_tokens=int(rng.integers(1, 12)), n=int(rng.choice([1, 2])))
        streams.append(engine.add_request(prompt, params, stream=False))
        if rng.random() < 0.25:
            engine.abort(streams[-1].request_id)
        if len(streams) >= 24:
            for s in streams:
                s.result(timeout=300)
            streams = []
    for s in streams:
        s.result(timeout=300)
    wait_idle(engine)   # asserts no block is held
    assert sum(s.get("prefix_cache_hits", 0) for s in engine.stats()) > 0


def test_openai_usage_and_metrics_report_cached_tokens(loop):
    """The official client sees usage.prompt_tokens_details.cached_tokens as vLLM reports it;
    another cache_salt shares nothing; /metrics counts queries and hits under vLLM's names."""
    import openai
    from tests._server_helpers import parse_metrics

    served = loop.serve()
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="none")
    prefix = "The quick brown fox jumps over the lazy dog. " * 6
    kw = dict(model="opt-tiny", max_tokens=2, temperature=0)
    first = client.completions.create(prompt=prefix + "One", **kw)
    second = client.completions.create(prompt=prefix + "Two", **kw)
    salted = client.completions.create(prompt=prefix + "Two", extra_body={"cache_salt": "b"},
                                       **kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 48 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    _, _, text = served.request("GET", "/metrics")
    metrics = parse_metrics(text)
    hits = sum(v for _, v in metrics["vllm:prefix_cache_hits_total"])
    queries = sum(v for _, v in metrics["vllm:prefix_cache_queries_total"])
    assert hits >= cached and queries >= 3 * first.usage.prompt_tokens


# ---------------------------------------------------------------- one prefill step, one program


def test_one_prefill_step_runs_whole_prompts_and_cached_continuations_against_transformers(
        hf_opt):
    """On a CPU every prefill reads its keys from the pages (one program per token bucket for
    whole prompts and for prompts past cached blocks): a step holding a whole prompt that
    scores its tokens and a prompt continuing its cached first blocks gives transformers'
    next tokens and prompt log-probabilities."""
    import jax
    import jax.numpy as jnp
    import torch

    from dsjax.config import EngineConfig
    from dsjax.engine.core import resolve_model
    from dsjax.engine.instance_hosts import params_loader
    from dsjax.executor.batch import PrefillRow, SamplingRow
    from dsjax.executor.kernels import get_attention_backend
    from dsjax.executor.parallel import single_instance_spec
    from dsjax.executor.runner import ModelRunner

    model, path = hf_opt
    config = EngineConfig(model=str(path))
    mc, model_dir = resolve_model(config.model, config.load_format)
    runner = ModelRunner(single_instance_spec("prefill", jax.devices()[:1]), mc,
                         params_loader(config, mc, model_dir, jnp.float32), dtype=jnp.float32,
                         num_pages=64, page_size=4, attention=get_attention_backend("xla"),
                         max_batch_size=4, max_tokens_per_batch=128, max_blocks_per_request=16)
    assert runner.prefill_reads_pages == (jax.devices()[0].platform == "cpu")
    rng = np.random.default_rng(11)
    whole, continued = rng.integers(4, 1000, 13).tolist(), rng.integers(4, 1000, 18).tolist()
    scored = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    runner.prefill([PrefillRow(tuple(continued[:8]), (20, 21), (SamplingRow(GREEDY, 0, 0),))])
    # (the continuation first: the whole prompt's scores start after its 10 computed tokens)
    step = [PrefillRow(tuple(continued), (20, 21, 22, 23, 24), (SamplingRow(GREEDY, 0, 0),),
                       start=8),
            PrefillRow(tuple(whole), (0, 1, 2, 3), (SamplingRow(scored, 0, 0),))]
    out = (runner.prefill if runner.prefill_reads_pages else runner.prefill_cached)(step)
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([p])).logits[0], -1).numpy()
               for p in (continued, whole)]
    assert out.tokens.tolist() == [int(r[-1].argmax()) for r in ref]
    want = ref[1][np.arange(len(whole) - 1), whole[1:]]
    np.testing.assert_allclose(out.prompt_scores[1][0], want, atol=2e-4)
    # A scored prompt past cached blocks would lack its cached tokens' scores: refused.
    with pytest.raises(ValueError, match="prompt_logprobs"):
        runner.prefill_cached([PrefillRow(tuple(continued), (20, 21, 22, 23, 24),
                                          (SamplingRow(scored, 0, 0),), start=8)])
