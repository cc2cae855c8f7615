"""LLM.generate over iterables (grain datasets, generators) and LLM.generate_iter streaming them
in input order through a bounded window; the reference is generate() on the same prompts as a
list (which the offline API's tests check against transformers)."""
from __future__ import annotations

import grain
import numpy as np
import pytest

from dsjax import LLM, SamplingParams
from tests._engine_helpers import wait_idle
from tests._server_helpers import TINY_SERVER_ENGINE

PROMPTS = [np.random.default_rng(3).integers(4, 1000, n).tolist() for n in (3, 9, 5, 14, 2, 7, 11)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # test_run_batch's engine settings: in one session, its compiled programs serve here too.
    llm = LLM(**TINY_SERVER_ENGINE, mode="colocated", min_decode_rows=8)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_grain_datasets_generators_and_prompt_dicts_give_the_lists_outputs(llm, reference,
                                                                          capsys):
    dataset = grain.MapDataset.source(PROMPTS)
    assert [o.token_ids for o in llm.generate(dataset, GREEDY)] == reference
    assert f"{len(PROMPTS)}/{len(PROMPTS)}" in capsys.readouterr().err   # a sized bar
    arrays = dataset.map(np.asarray).to_iter_dataset()
    assert [o.token_ids for o in llm.generate(arrays, GREEDY, use_tqdm=False)] == reference
    dicts = ({"prompt_token_ids": p} for p in PROMPTS)
    assert [o.token_ids for o in llm.generate(dicts, GREEDY, use_tqdm=False)] == reference
    wait_idle(llm.engine)


def test_generate_iter_keeps_at_most_a_window_of_prompts_ahead(llm, reference, monkeypatch):
    submitted, pulled = [], []
    add_request = llm.engine.add_request
    monkeypatch.setattr(llm.engine, "add_request",
                        lambda *a, **k: submitted.append(1) or add_request(*a, **k))

    def prompts():
        for p in PROMPTS:
            pulled.append(1)
            yield p

    window = 3
    outputs = []
    for k, out in enumerate(llm.generate_iter(prompts(), GREEDY, use_tqdm=False,
                                              window=window)):
        # Output k is out: at most `window` prompts were taken from k on.
        assert len(submitted) <= k + window and len(pulled) <= k + window
        outputs.append(out.token_ids)
    assert outputs == reference
    wait_idle(llm.engine)


def test_closing_the_stream_early_aborts_what_is_in_flight(llm):
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    stream = llm.generate_iter(iter(PROMPTS * 3), long, use_tqdm=False, window=6)
    first = next(stream)
    assert len(first.token_ids) == 60
    stream.close()
    wait_idle(llm.engine)       # every block of the aborted requests freed


def test_one_params_per_prompt_of_an_iterable(llm, reference):
    params = [GREEDY] * len(PROMPTS)
    outs = llm.generate(iter(PROMPTS), params, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(iter(PROMPTS), params[:-1], use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(iter(PROMPTS[:-1]), params, use_tqdm=False)
    with pytest.raises(ValueError, match="'prompt' \\(text\\) or 'prompt_token_ids'"):
        llm.generate(iter([{"text": "x"}]), use_tqdm=False)
    wait_idle(llm.engine)
