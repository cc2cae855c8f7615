"""Every family serves transformers' own greedy tokens, in every way the engine places a model.

For each family a random-weight checkpoint is written with transformers, its features on
(tests/_hf_helpers.FAMILY_KINDS: GQA, llama3 RoPE scaling past the original context, a sliding
window, QKV biases and a tied head, QK-norm with an explicit head_dim, GPT-2's fused Conv1D),
and three engines serve it:
- disaggregated, prefill TP 4 (above LLaMA's 2 KV heads: each is repeated) -> two decode
  instances of TP 1, so KV migrates between different TP degrees;
- colocated with PP 2 x TP 2 under memory pressure (swap to host and back), and LLaMA at TP 4
  under it (each KV head repeated on the devices, kept once on the host);
- chunked prefill (Sarathi) with a 16-token budget.
The multi-process backend runs the GQA family (the worker and model code are the same).
"""
from __future__ import annotations

import functools

import pytest

from dsjax import SamplingParams
from tests._engine_helpers import generate, hf_engine, shutdown_all, watch_swaps
from tests._hf_helpers import hf_greedy, make_hf_family, save_safetensors
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

KINDS = ["llama", "llama_linear", "mistral", "qwen2", "qwen3", "gpt2"]
GREEDY = SamplingParams(temperature=0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)
PLACEMENTS = {
    "tp4->2x tp1": dict(context_tensor_parallel_size=4, num_decode_instances=2),
    "colocated pp2 tp2 swap": dict(mode="colocated", context_tensor_parallel_size=2,
                                   context_pipeline_parallel_size=2, num_blocks=24),
    "chunked": dict(mode="chunked", decoding_max_tokens_per_batch=16),
}


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


@functools.cache
def family_checkpoint(kind: str, root: str):
    """(transformers model, its directory, transformers' greedy tokens of every prompt)."""
    from pathlib import Path
    model = make_hf_family(kind, seed=3)
    path = save_safetensors(model, Path(root) / kind)
    return model, path, [hf_greedy(model, p, ENGINE_MAX_NEW) for p in engine_prompts()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("families"))
    return lambda kind: family_checkpoint(kind, root)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("kind", KINDS)
def test_family_placement_matches_transformers(kind, placement, checkpoints):
    """Under swap, the host keeps each of the model's KV heads once, as swap_space counts
    them, though TP 2 above llama_linear's one KV head holds it twice on the devices."""
    model, path, reference = checkpoints(kind)
    engine = hf_engine(path, **PLACEMENTS[placement])
    with watch_swaps(engine) as held:
        assert generate(engine, engine_prompts(), GREEDY) == reference
    stats = {s["instance"]: s for s in engine.stats()}
    if placement.startswith("tp4"):
        assert all(stats[f"decode{i}"]["migrations"] > 0 for i in range(2)), stats
    if "swap" in placement:
        assert stats["colocated0"]["num_preemptions"] > 0, "no swap: raise the pressure"
        kv_heads = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
        assert held and all(heads == {kv_heads} for _, heads, _, _ in held), (kv_heads, held)
    shutdown_all()   # one engine at a time: they hold their devices' memory


def test_a_swap_keeps_one_copy_of_each_kv_head_that_tp_repeats(checkpoints):
    """LLaMA's 2 KV heads at TP 4: the devices hold each head twice (h0 h0 h1 h1). A swap
    keeps each once on the host and puts both copies back; had it kept the wrong cache heads
    (h0 h0, a tiled layout's), the swapped requests would attend to the wrong keys and leave
    transformers' tokens. Warm-up (here of 8-token prompts and 8 rows) makes every page
    copy's programs ready, whatever its length ranges: the swaps compile none after ready."""
    from dsjax.executor.compile_watch import CompileWatch
    model, path, reference = checkpoints("llama")
    assert model.config.num_key_value_heads == 2
    engine = hf_engine(path, mode="colocated", context_tensor_parallel_size=4, num_blocks=24,
                       warmup_max_prompt_len=8, warmup_max_prefill_batch=1,
                       warmup_max_decode_batch=8)
    with watch_swaps(engine) as held, CompileWatch() as watch:
        assert generate(engine, engine_prompts(), GREEDY) == reference
    page_programs = [name for name in (*watch.names, *watch.compiled)
                     if name in ("jit(_insert)", "jit(_gather)", "insert", "gather")]
    assert not page_programs, watch.describe()
    stats = {s["instance"]: s for s in engine.stats()}
    assert stats["colocated0"]["num_preemptions"] > 0, "no swap: raise the pressure"
    assert held and all(heads == {2} for _, heads, _, _ in held), held
    shutdown_all()


@pytest.mark.slow
def test_gqa_family_on_the_multiprocess_backend(checkpoints):
    _, path, reference = checkpoints("llama")
    engine = hf_engine(path, distributed_executor_backend="mp",
                       context_tensor_parallel_size=2)
    assert generate(engine, engine_prompts(), GREEDY) == reference
    shutdown_all()
