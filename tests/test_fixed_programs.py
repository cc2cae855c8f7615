"""After ready, no valid request compiles a program, whatever its sampling options.

Each compiled program maps executable memory that is never returned; before sampling options
rode in fixed-shape inputs, ~94 varied requests exhausted the kernel's mapping limit and the
server aborted. Here hundreds of distinct option mixes (benchmarks/varied_options.py draws
them: logprobs, prompt logprobs, penalties, logit_bias up to 300 entries, n and best_of,
min_tokens with stop ids, stop strings, top-k, top-p, seeds) run under memory pressure (swap,
copy-on-write, back-pressure), and JAX's own lowering events must count zero.
"""
from __future__ import annotations

import random
import zlib

import pytest

from benchmarks.varied_options import streamable, varied_params
from dsjax.executor.compile_watch import CompileWatch, memory_mappings
from tests._engine_helpers import get_engine, shutdown_all, wait_idle

MAX_PROMPT = 32
WARM = dict(warmup_max_prompt_len=MAX_PROMPT, warmup_max_context_len=MAX_PROMPT + 24,
            warmup_max_prefill_batch=4, warmup_max_decode_batch=16, decoding_max_batch_size=16,
            context_max_batch_size=4, num_blocks=48)
# Disaggregated: fewer pages, so the decode instance swaps whatever the step speed (with 48,
# quicker decode steps left it too few concurrent sequences to swap in half of the runs).
MODES = {"disaggregated": dict(num_blocks=36), "colocated": dict(mode="colocated"),
         "chunked": dict(mode="chunked", decoding_max_tokens_per_batch=32)}


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_varied_options_compile_nothing_after_ready(mode):
    engine = get_engine(**{**WARM, **MODES[mode]})
    vocab = engine.model_config.vocab_size
    rng = random.Random(zlib.crc32(mode.encode()))   # the same mix on every run
    requests = [(varied_params(rng, vocab, prompt_logprobs=mode != "chunked", max_tokens=20),
                 [rng.randrange(4, vocab) for _ in range(rng.randint(1, MAX_PROMPT))])
                for _ in range(96)]
    distinct = {params for params, _ in requests}
    assert len(distinct) == len(requests)
    maps_before = memory_mappings()
    with CompileWatch() as watch:
        for at in range(0, len(requests), 12):   # 12 at a time: batches, swaps, back-pressure
            group = requests[at:at + 12]
            streams = [engine.add_request(prompt, params, stream=streamable(params))
                       for params, prompt in group]
            for (params, _), stream in zip(group, streams):
                out = stream.result(timeout=300)
                assert len(out.outputs) == params.n
                assert all(1 <= len(o.token_ids) <= params.max_tokens for o in out.outputs)
        wait_idle(engine)
    assert watch.count == 0, f"programs compiled after ready: {watch.describe()}"
    # Each program used to add ~620 mappings; allocator arenas may add a few.
    assert memory_mappings() - maps_before < 60
    stats = {s["instance"]: s for s in engine.stats()}
    decoding = [s for s in stats.values() if s.get("role") != "prefill"]
    assert any(s["num_preemptions"] for s in decoding), "the run never swapped: raise pressure"


def test_whole_context_warm_up_with_a_cached_prefix_compiles_nothing_after_ready(hf_opt):
    """Warm-up reaches the model's whole context (128 tokens here), with and without a cached
    prefix block: a prompt that fills the context, then one that reuses its blocks, compile
    nothing and give transformers' tokens. (The cached variant once asked for a block past the
    context and the engine could not start.)"""
    from dsjax import SamplingParams
    from dsjax.config import WARMUP_ALL
    from tests._hf_helpers import hf_greedy
    engine = get_engine(model=str(hf_opt[1]), load_format="auto",
                        warmup_max_prompt_len=WARMUP_ALL, warmup_max_context_len=WARMUP_ALL,
                        warmup_max_prefill_batch=1, warmup_max_decode_batch=8,
                        decoding_max_batch_size=8, context_max_batch_size=1)
    context = engine.model_config.max_position_embeddings
    rng = random.Random(7)
    prompt = [rng.randrange(4, 1000) for _ in range(context - 4)]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with CompileWatch() as watch:
        full = engine.add_request(prompt, greedy).result(timeout=300)
        reused = engine.add_request(prompt[:-8] + [5, 6, 7, 8, 9, 10, 11, 12], greedy,
                                    ).result(timeout=300)
        wait_idle(engine)
    assert watch.count == 0, f"programs compiled after ready: {watch.describe()}"
    assert full.token_ids == hf_greedy(hf_opt[0], prompt, 4)
    assert reused.num_cached_tokens > 0
    assert reused.token_ids == hf_greedy(hf_opt[0], prompt[:-8] + [5, 6, 7, 8, 9, 10, 11, 12], 4)
