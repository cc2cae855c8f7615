"""Sampling parameters, the batched on-device sampler, and host-side stop conditions."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.executor.sampling import build_sampling_tensors, sample
from dsjax.sampling_params import SamplingParams
from dsjax.engine.stopping import StopChecker

VOCAB = 16
NUM_LOGPROBS = 4


@functools.partial(jax.jit, static_argnames=("num_logprobs", "mode"))
def jit_sample(logits, st, *, num_logprobs=0, mode="mixed"):
    return sample(logits, st, num_logprobs=num_logprobs, mode=mode)


def tensors(params, seeds=None, steps=None, pad_to=None):
    seeds = seeds if seeds is not None else [0] * len(params)
    steps = steps if steps is not None else [0] * len(params)
    st = build_sampling_tensors(params, seeds, steps, pad_to or len(params))
    return jax.tree.map(jnp.asarray, st)


def ranked_logits(batch, rng_seed=0):
    """Random logits [batch, VOCAB] with distinct values, so ranks are well defined."""
    rng = np.random.default_rng(rng_seed)
    return jnp.asarray(rng.normal(size=(batch, VOCAB)).astype(np.float32) * 2)


def draw_many(logits_row, params, draws):
    """`draws` samples of one row: one batch, each row its own step so the keys differ."""
    logits = jnp.broadcast_to(logits_row, (draws, VOCAB))
    st = tensors([params] * draws, seeds=[1234] * draws, steps=list(range(draws)))
    return np.asarray(jit_sample(logits, st).tokens)


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_beam_search_is_rejected():
    with pytest.raises(ValueError, match="not supported by dsjax"):
        SamplingParams(use_beam_search=True)


def test_params_normalise_and_report_greedy():
    p = SamplingParams(temperature=0, stop="###", stop_token_ids=[7, 9], logprobs=20)
    assert p.stop == ("###",) and p.stop_token_ids == (7, 9)
    assert p.is_greedy and not SamplingParams(temperature=0.8).is_greedy
    assert hash(p) == hash(SamplingParams(temperature=0, stop=["###"], stop_token_ids=(7, 9),
                                          logprobs=20))


def test_build_sampling_tensors_pads_with_greedy_rows():
    st = build_sampling_tensors([SamplingParams(temperature=0.5, top_k=-1, top_p=0.9)],
                                seeds=[-1], steps=[3], pad_to=4)
    np.testing.assert_array_equal(st.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(st.top_k, [0, 0, 0, 0])
    np.testing.assert_allclose(st.top_p, [0.9, 1, 1, 1])
    assert st.seeds.dtype == np.uint32 and st.seeds[0] == 0xFFFFFFFF
    np.testing.assert_array_equal(st.steps, [3, 0, 0, 0])
    with pytest.raises(ValueError, match="pad_to"):
        build_sampling_tensors([SamplingParams()] * 2, [0, 0], [0, 0], pad_to=1)


# ---------------------------------------------------------------- sampler

def test_greedy_mode_and_greedy_rows_of_mixed_mode_are_argmax():
    logits = ranked_logits(6)
    want = np.argmax(np.asarray(logits), axis=-1)
    greedy = tensors([SamplingParams(temperature=0)] * 6)
    np.testing.assert_array_equal(jit_sample(logits, greedy, mode="greedy").tokens, want)
    # Mixed batch: greedy rows (even) must still be exactly argmax next to sampled rows.
    mixed = tensors([SamplingParams(temperature=0 if r % 2 == 0 else 5.0) for r in range(6)],
                    seeds=list(range(6)))
    got = np.asarray(jit_sample(logits, mixed).tokens)
    np.testing.assert_array_equal(got[0::2], want[0::2])


def test_top_k_never_emits_tokens_outside_the_k_largest():
    logits = ranked_logits(1)[0]
    allowed = set(np.argsort(-np.asarray(logits))[:3].tolist())
    # High temperature flattens the distribution, so excluded tokens would show up if leaked.
    drawn = draw_many(logits, SamplingParams(temperature=10.0, top_k=3), draws=2000)
    assert set(drawn.tolist()) == allowed


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.array([0.4, 0.3, 0.2, 0.1] + [0.0] * (VOCAB - 4))
    logits = jnp.asarray(np.log(np.where(probs > 0, probs, 1e-9)).astype(np.float32))
    order = np.array([5, 2, 9, 0] + [i for i in range(VOCAB) if i not in (5, 2, 9, 0)])
    logits = logits[np.argsort(order)]  # ranks land on scattered ids, not on 0, 1, 2
    # Mass 0.4 + 0.3 = 0.7 < 0.75, so the third token (id 9) is needed and the fourth is not.
    drawn = draw_many(logits, SamplingParams(temperature=1.0, top_p=0.75), draws=2000)
    assert set(drawn.tolist()) == {5, 2, 9}
    # A tiny top_p keeps only the most likely token.
    drawn = draw_many(logits, SamplingParams(temperature=1.0, top_p=1e-6), draws=200)
    assert set(drawn.tolist()) == {5}


def test_frequencies_match_renormalised_distribution():
    logits = ranked_logits(1, rng_seed=3)[0] / 2
    temperature, top_k, draws = 0.7, 5, 8000
    drawn = draw_many(logits, SamplingParams(temperature=temperature, top_k=top_k), draws)
    scaled = np.asarray(logits, np.float64) / temperature
    kept = np.argsort(-scaled)[:top_k]
    want = np.zeros(VOCAB)
    want[kept] = np.exp(scaled[kept] - scaled[kept].max())
    want /= want.sum()
    freq = np.bincount(drawn, minlength=VOCAB) / draws
    # 5 standard errors per token: a correct sampler passes, a wrong temperature does not.
    tolerance = 5 * np.sqrt(want * (1 - want) / draws) + 1e-12
    assert np.all(np.abs(freq - want) <= tolerance), (freq, want)


def test_seeded_rows_repeat_whatever_their_row_and_batch():
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=42)
    row = ranked_logits(1, rng_seed=7)[0]
    single = jit_sample(row[None], tensors([params], seeds=[42], steps=[5])).tokens[0]
    others = [SamplingParams(temperature=2.0, top_k=4)] * 5
    batch = tensors(others[:3] + [params] + others[3:], seeds=[1, 2, 3, 42, 5, 6],
                    steps=[0, 1, 2, 5, 4, 5], pad_to=8)
    logits = ranked_logits(8, rng_seed=9).at[3].set(row)
    assert int(jit_sample(logits, batch).tokens[3]) == int(single)
    # The whole per-step stream also repeats across calls.
    first = draw_many(row, params, draws=64)
    np.testing.assert_array_equal(first, draw_many(row, params, draws=64))


def test_different_steps_and_seeds_give_different_draws():
    row = jnp.zeros(VOCAB)  # uniform: draws only differ through the key
    params = SamplingParams(temperature=1.0)
    by_step = jit_sample(jnp.broadcast_to(row, (32, VOCAB)),
                         tensors([params] * 32, seeds=[7] * 32, steps=list(range(32)))).tokens
    by_seed = jit_sample(jnp.broadcast_to(row, (32, VOCAB)),
                         tensors([params] * 32, seeds=list(range(32)), steps=[0] * 32)).tokens
    # 32 uniform draws over 16 tokens: a shared key would give one token only.
    assert len(set(np.asarray(by_step).tolist())) > 8
    assert len(set(np.asarray(by_seed).tolist())) > 8


@pytest.mark.parametrize("mode", ["greedy", "mixed"])
def test_logprobs_are_model_log_softmax_and_top_n_most_likely(mode):
    logits = ranked_logits(4, rng_seed=11)
    temperature = 0.0 if mode == "greedy" else 3.0
    st = tensors([SamplingParams(temperature=temperature, top_k=2, logprobs=NUM_LOGPROBS)] * 4,
                 seeds=[1, 2, 3, 4])
    out = jit_sample(logits, st, num_logprobs=NUM_LOGPROBS, mode=mode)
    raw = np.asarray(logits, np.float64)
    want = raw - raw.max(-1, keepdims=True)
    want -= np.log(np.exp(want).sum(-1, keepdims=True))
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprob, want[np.arange(4), tokens], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-want, axis=-1)[:, :NUM_LOGPROBS])
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-want, axis=-1)[:, :NUM_LOGPROBS],
                               rtol=1e-5, atol=1e-6)
    # Rows that ask for no top-N: the same program skips it at run time (zeros), and the
    # tokens and chosen log-probabilities do not change.
    plain = tensors([SamplingParams(temperature=temperature, top_k=2)] * 4, seeds=[1, 2, 3, 4])
    none = jit_sample(logits, plain, num_logprobs=NUM_LOGPROBS, mode=mode)
    assert not np.asarray(none.top_ids).any() and not np.asarray(none.top_logprobs).any()
    np.testing.assert_array_equal(none.tokens, out.tokens)
    np.testing.assert_allclose(none.logprob, out.logprob)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        sample(ranked_logits(1), tensors([SamplingParams()]), mode="beam")


# ---------------------------------------------------------------- StopChecker

EOS = 2


def run_checker(params, tokens, texts=None):
    """Feed tokens one by one; return (index of the finishing token, decision)."""
    checker = StopChecker(params, eos_token_id=EOS)
    texts = texts or [None] * len(tokens)
    for i, (token, text) in enumerate(zip(tokens, texts)):
        decision = checker.check(token, i + 1, text)
        if decision.finished:
            return i, decision
    return None, decision


def test_eos_stops_unless_ignored():
    assert run_checker(SamplingParams(max_tokens=10), [5, 6, EOS, 7])[0] == 2
    index, decision = run_checker(SamplingParams(max_tokens=10, ignore_eos=True), [5, EOS, 7, 8])
    assert index is None and not decision.finished


def test_eos_is_not_honoured_before_min_tokens():
    index, decision = run_checker(SamplingParams(min_tokens=3, max_tokens=10),
                                  [EOS, EOS, EOS, 4])
    assert index == 2 and decision.finish_reason == "stop"


def test_stop_token_ids_stop_with_reason_stop():
    index, decision = run_checker(SamplingParams(stop_token_ids=[9], max_tokens=10), [4, 9, 5])
    assert index == 1 and decision.finish_reason == "stop"


def test_max_tokens_stops_with_reason_length():
    index, decision = run_checker(SamplingParams(max_tokens=3), [4, 5, 6, 7], ["a", "ab", "abc", "abcd"])
    assert index == 2 and decision.finish_reason == "length" and decision.text == "abc"


def test_stop_string_spanning_tokens_is_trimmed():
    texts = ["Hello", "Hello wor", "Hello world EN", "Hello world END and more"]
    index, decision = run_checker(SamplingParams(stop=["xyz", "END"], max_tokens=10),
                                  [10, 11, 12, 13], texts)
    assert index == 3 and decision.finish_reason == "stop"
    assert decision.text == "Hello world "


def test_earliest_stop_string_wins_and_old_text_is_not_rescanned():
    # "AB" completes first in the text even though "B" is later in the list order.
    index, decision = run_checker(SamplingParams(stop=["CD", "AB"], max_tokens=10),
                                  [10, 11], ["xA", "xABCD"])
    assert index == 1 and decision.text == "x"
    # A stop string already in the text before min_tokens is not matched later.
    index, _ = run_checker(SamplingParams(stop=["AB"], min_tokens=2, max_tokens=10),
                           [10, 11, 12], ["AB", "AB c", "AB cd"])
    assert index is None


def test_stop_strings_need_text():
    index, decision = run_checker(SamplingParams(stop=["a"], max_tokens=2), [1, 1])
    assert index == 1 and decision.finish_reason == "length" and decision.text is None


def test_temperature_mode_draws_like_mixed_mode_without_sorting():
    """A seeded row samples the same token whether or not its batch needed top-k/top-p."""
    from dsjax.executor.sampling import build_sampling_tensors, sample
    logits = jax.random.normal(jax.random.key(5), (4, 300)) * 3
    plain = [SamplingParams(temperature=0.7, seed=s) for s in range(4)]
    st = build_sampling_tensors(plain, [p.seed for p in plain], [3] * 4, 4)
    st = jax.tree_util.tree_map(jnp.asarray, st)
    a = sample(logits, st, mode="temperature")
    b = sample(logits, st, mode="mixed")
    assert a.tokens.tolist() == b.tokens.tolist()
    hlo = jax.jit(lambda l, t: sample(l, t, mode="temperature")).lower(logits, st).as_text()
    assert "stablehlo.sort" not in hlo


@pytest.mark.parametrize("mode", ["greedy", "mixed"])
def test_eos_is_banned_before_min_tokens(mode):
    logits = jnp.zeros((3, 50)).at[:, 7].set(10.0)  # eos (7) is by far the most likely
    params = [SamplingParams(temperature=0 if mode == "greedy" else 1.0, min_tokens=3),
              SamplingParams(temperature=0 if mode == "greedy" else 1.0, min_tokens=3),
              SamplingParams(temperature=0 if mode == "greedy" else 1.0, min_tokens=3,
                             ignore_eos=True)]
    st = build_sampling_tensors(params, [1, 2, 3], [0, 3, 0], 3, eos_token_id=7)
    out = sample(logits, jax.tree_util.tree_map(jnp.asarray, st), mode=mode)
    assert out.tokens[0] != 7          # 0 generated < min_tokens: eos may not end it
    assert out.tokens[1] == 7          # min_tokens reached
    assert out.tokens[2] == 7          # ignore_eos: eos is an ordinary token


@pytest.mark.parametrize("params, mode", [
    ([SamplingParams(temperature=0)] * 3, "greedy"),
    ([SamplingParams(temperature=0), SamplingParams(temperature=0.7)] * 2, "temperature"),
    ([SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.0, top_p=0.5),
      SamplingParams(temperature=0)], "mixed"),
])
def test_auto_mode_takes_the_batchs_cheapest_exact_path(params, mode):
    """The engine compiles one program ("auto") that branches at run time; each branch must be
    the explicit mode the batch needs (the explicit modes are checked statistically above)."""
    logits = ranked_logits(len(params), rng_seed=5)
    st = tensors(params, seeds=list(range(len(params))), steps=[2] * len(params))
    auto = jit_sample(logits, st, num_logprobs=NUM_LOGPROBS, mode="auto")
    explicit = jit_sample(logits, st, num_logprobs=NUM_LOGPROBS, mode=mode)
    np.testing.assert_array_equal(auto.tokens, explicit.tokens)
    np.testing.assert_allclose(auto.logprob, explicit.logprob)


# ---------------------------------------------------------------- slot table

def numpy_slot_logits(logits, params, prompt, output, step):
    """vLLM's definitions in float64: bias, repetition (prompt and output tokens), frequency
    and presence (output tokens), then stop ids banned while step < min_tokens."""
    out = np.asarray(logits, np.float64).copy()
    for t, b in params.logit_bias:
        out[t] += b
    counts = np.bincount(output, minlength=out.size)
    seen = (counts > 0) | np.isin(np.arange(out.size), prompt)
    rep = params.repetition_penalty
    out = np.where(seen, np.where(out > 0, out / rep, out * rep), out)
    out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if step < params.min_tokens:
        out[list(params.stop_token_ids)] = -np.inf
    return out


def test_slot_table_rows_get_their_own_penalties_bias_and_bans():
    """Rows with slots get exactly NumPy's penalised logits (greedy picks their argmax and
    none of the banned ids); rows without a slot in the same batch are untouched; the table
    counts each sampled token in its row's slot."""
    from dsjax.executor.sampling import SlotTable, fill_slot, record_tokens, slot_inputs
    vocab = 40
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, vocab)).astype(np.float32) * 3
    penalised = [
        (SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.7,
                        logit_bias={3: 5.0, 9: -80.0}), [1, 2, 3], [5, 5, 7], 3),
        (SamplingParams(temperature=0, repetition_penalty=1.9, min_tokens=4,
                        stop_token_ids=[11, 12, 13]), [11, 20, 21], [12], 1),
    ]
    table = SlotTable.zeros(6, vocab)
    for slot, (params, prompt, output, _) in zip((4, 1), penalised):
        table = fill_slot(table, slot, **slot_inputs(params, prompt, output, 32))
    plain = SamplingParams(temperature=0)
    rows = [penalised[0][0], plain, penalised[1][0], plain]
    st = build_sampling_tensors(rows, [0] * 4, [penalised[0][3], 0, penalised[1][3], 0], 4,
                                slots=[4, -1, 1, -1])
    st = jax.tree.map(jnp.asarray, st)
    # Row 2's unpenalised favourites are its banned stop ids: the ban must move it.
    logits[2, [11, 12, 13]] += 20.0
    out = jax.jit(sample)(jnp.asarray(logits), st, table)
    want = [np.argmax(numpy_slot_logits(logits[0], *penalised[0][:3], penalised[0][3])),
            np.argmax(logits[1]),
            np.argmax(numpy_slot_logits(logits[2], *penalised[1][:3], penalised[1][3])),
            np.argmax(logits[3])]
    np.testing.assert_array_equal(out.tokens, want)
    assert int(out.tokens[2]) not in (11, 12, 13)
    counted = record_tokens(table, st.slots, out.tokens)
    added = np.asarray(counted.counts - table.counts)
    assert added.sum() == 2
    assert added[4, want[0]] == 1 and added[1, want[2]] == 1
