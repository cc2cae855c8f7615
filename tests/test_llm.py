"""The offline API end to end: LLM(...).generate against transformers on a real checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsjax import LLM, SamplingParams
from tests._engine_helpers import wait_idle
from tests._hf_helpers import hf_greedy, make_hf_opt, save_safetensors

PROMPTS = [[2, 17, 300, 45, 9], [2, 800], [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_opt("pre_ln", seed=3)


@pytest.fixture(scope="module")
def llm(hf_model, tmp_path_factory):
    model_dir = save_safetensors(hf_model, tmp_path_factory.mktemp("llm") / "opt")
    llm = LLM(str(model_dir), block_size=4, num_blocks=64,   # dtype "auto": float32 on CPU
              decoding_tensor_parallel_size=2)
    yield llm
    llm.shutdown()


def test_greedy_matches_transformers_in_input_order(llm, hf_model):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert [o.token_ids for o in outs] == [hf_greedy(hf_model, p, MAX_TOKENS) for p in PROMPTS]
    assert all(o.finish_reason == "length" and o.text is None for o in outs)
    wait_idle(llm.engine)


def test_stop_token_ids_end_the_output(llm, hf_model):
    expected = hf_greedy(hf_model, PROMPTS[0], MAX_TOKENS)
    stop = expected[2]
    first = expected.index(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                  stop_token_ids=[stop]), use_tqdm=False)[0]
    assert out.token_ids == expected[:first + 1] and out.finish_reason == "stop"


def test_logprobs_are_the_models(llm, hf_model):
    n = 3
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=4, logprobs=n,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert len(out.logprobs) == 4
    ids = list(PROMPTS[1])
    for token, lp in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1], -1).numpy()
        top = np.argsort(-ref)[:n]
        assert set(top.tolist()) | {token} == set(lp)
        for t, v in lp.items():
            assert v == pytest.approx(float(ref[t]), abs=1e-4)
        ids.append(token)


def test_one_params_per_prompt_and_seeded_sampling_repeats(llm):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=6, ignore_eos=True)
              for s in (1, 2, 3)]
    a = llm.generate(PROMPTS, params, use_tqdm=False)
    b = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(PROMPTS, params[:2], use_tqdm=False)


def test_clear_errors():
    with pytest.raises(ValueError, match="load_format='dummy'"):
        LLM("opt-125m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM("/nonexistent/opt-dir")
    with pytest.raises(TypeError, match="unknown settings"):
        LLM("opt-tiny", load_format="dummy", batch_sise=3)


def test_dummy_opt_125m_generates_text():
    """The README's promise: a dummy-weight OPT-125m generates on any machine."""
    with LLM("opt-125m", load_format="dummy", dtype="float32") as llm:
        out = llm.generate("The capital of France is",
                           SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.token_ids) == 4 and isinstance(out.text, str)
        assert out.prompt_token_ids[0] == 2  # OPT's BOS
        wait_idle(llm.engine)
