"""Every family in models/ (+ models/weights.py) must be exactly its transformers model:
logits equal Hugging Face's.

Random-weight checkpoints are written with transformers, each family's own features switched
on (three OPT variants; LLaMA with GQA and llama3 RoPE scaling past its original context, and
with linear scaling and one KV head; Mistral's sliding window; Qwen2's QKV biases and tied
head; Qwen3's QK-norm and explicit head_dim; GPT-2's fused Conv1D attention), loaded with
load_hf_params, and run through the family's module on a paged KV cache: a packed prefill of
three prompts, then greedy decode steps through block tables, and a chunked step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from _hf_helpers import (FAMILY_KINDS, TINY_HF_CONFIGS, make_hf_family, make_hf_opt,
                         save_pytorch_bin, save_safetensors)
from dsjax.models.attention import ChunkedMetadata, DecodeMetadata, PrefillMetadata, XLAAttention
from dsjax.models.registry import config_from_dir
from dsjax.models.weights import load_hf_params

PAGE_SIZE = 4
NUM_PAGES = 40
NOWHERE = NUM_PAGES * PAGE_SIZE  # a slot past the cache: padding writes are dropped
PROMPT_LENS = (7, 21, 1)  # cross page boundaries and llama3's original context (16); and 1
PREFILL_BUCKET = 32  # token axis padded past sum(PROMPT_LENS)
DECODE_BUCKET = 4  # three sequences plus one padding row
DECODE_STEPS = 10
PAGES_PER_SEQ = 8  # covers 21 + 10 tokens

# One checkpoint format per variant, so every reader feeds the numerical comparison.
SAVERS = {
    "pre_ln": lambda m, d: save_safetensors(m, d, max_shard_size="40KB"),  # sharded + index
    "proj_post_ln": lambda m, d: save_pytorch_bin(m, d),
    "head_dim_80": lambda m, d: save_safetensors(m, d),
}
KINDS = [*TINY_HF_CONFIGS, *FAMILY_KINDS, "gpt2"]


class Case:
    """A HF model, our params loaded from its checkpoint, and jitted prefill/decode/chunked
    steps that return the logits of each row's last token."""

    def __init__(self, kind, tmp_dir):
        torch.set_num_threads(2)
        if kind in TINY_HF_CONFIGS:
            self.hf = make_hf_opt(kind, seed=1)
            path = SAVERS[kind](self.hf, tmp_dir / kind)
        else:
            self.hf = make_hf_family(kind, seed=1)
            path = save_safetensors(self.hf, tmp_dir / kind)
        self.config = config_from_dir(path)
        self.params = load_hf_params(path, self.config, jnp.float32)
        rng = np.random.default_rng(0)
        self.prompts = [rng.integers(4, self.config.vocab_size, n).tolist() for n in PROMPT_LENS]
        self.prefill = self._jit("prefill")
        self.decode = self._jit("decode")
        self.chunked = self._jit("chunked")

    def _jit(self, mode):
        model = self.config.module(XLAAttention(), mode)

        def step(params, tokens, cache, meta):
            hidden, cache = model.apply({"params": params}, tokens, cache, meta)
            last = hidden if mode == "decode" else hidden[meta.last_token_idx]
            return model.apply({"params": params}, last, method="logits"), cache
        return jax.jit(step)

    def empty_cache(self):
        c = self.config
        shape = (c.num_hidden_layers, NUM_PAGES, PAGE_SIZE, c.cache_kv_heads(), c.head_dim)
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)


def slot(pages, position):
    return pages[position // PAGE_SIZE] * PAGE_SIZE + position % PAGE_SIZE


def prefill_metadata(prompts, page_tables):
    tokens, positions, seq_ids, slots = [], [], [], []
    for i, prompt in enumerate(prompts):
        tokens += prompt
        positions += range(len(prompt))
        seq_ids += [i] * len(prompt)
        slots += [slot(page_tables[i], p) for p in range(len(prompt))]
    pad = PREFILL_BUCKET - len(tokens)
    cu = np.cumsum([0, *map(len, prompts)])
    meta = PrefillMetadata(
        positions=jnp.array(positions + [0] * pad, jnp.int32),
        seq_ids=jnp.array(seq_ids + [-1] * pad, jnp.int32),
        cu_seqlens=jnp.array(cu, jnp.int32),
        slot_mapping=jnp.array(slots + [NOWHERE] * pad, jnp.int32),
        last_token_idx=jnp.array(cu[1:] - 1, jnp.int32))
    return jnp.array(tokens + [0] * pad, jnp.int32), meta


def decode_metadata(lengths, page_tables):
    """The new token of sequence i sits at position lengths[i]; the last row is padding."""
    pad = DECODE_BUCKET - len(lengths)
    meta = DecodeMetadata(
        positions=jnp.array([*lengths] + [0] * pad, jnp.int32),
        slot_mapping=jnp.array([slot(page_tables[i], n) for i, n in enumerate(lengths)]
                               + [NOWHERE] * pad, jnp.int32),
        block_tables=jnp.array([*page_tables] + [[0] * PAGES_PER_SEQ] * pad, jnp.int32),
        context_lens=jnp.array([n + 1 for n in lengths] + [0] * pad, jnp.int32))
    return meta


def run_greedy(case, page_tables):
    """Prefill then DECODE_STEPS greedy steps -> (logits per step [steps+1, 3, V], tokens)."""
    cache = case.empty_cache()
    tokens, meta = prefill_metadata(case.prompts, page_tables)
    logits, cache = case.prefill(case.params, tokens, cache, meta)
    all_logits = [np.asarray(logits)]
    generated = [[int(t)] for t in np.argmax(all_logits[-1], -1)]
    lengths = list(PROMPT_LENS)
    for _ in range(DECODE_STEPS):
        meta = decode_metadata(lengths, page_tables)
        last = [g[-1] for g in generated] + [0] * (DECODE_BUCKET - len(generated))
        logits, cache = case.decode(case.params, jnp.array(last, jnp.int32), cache, meta)
        step = np.asarray(logits)[:len(generated)]
        all_logits.append(step)
        for g, t in zip(generated, np.argmax(step, -1)):
            g.append(int(t))
        lengths = [n + 1 for n in lengths]
    return np.stack(all_logits), generated


def contiguous_pages():
    return [list(range(i * PAGES_PER_SEQ, (i + 1) * PAGES_PER_SEQ)) for i in range(len(PROMPT_LENS))]


def shuffled_pages(seed):
    perm = np.random.default_rng(seed).permutation(NUM_PAGES)
    return [perm[i * PAGES_PER_SEQ:(i + 1) * PAGES_PER_SEQ].tolist() for i in range(len(PROMPT_LENS))]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def assert_logits_close(ours, ref):
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def contiguous_run(case):
    return run_greedy(case, contiguous_pages())


def test_prefill_and_every_decode_step_match_hf(case, contiguous_run):
    logits, generated = contiguous_run
    assert np.abs(logits).max() > 1.0  # random weights give non-trivial logits
    for i, (prompt, gen) in enumerate(zip(case.prompts, generated)):
        # Causal: HF's logits at position j of the full sequence are the step that saw j+1 tokens.
        ref = hf_logits(case.hf, prompt + gen[:-1])
        ours = logits[:, i]  # [steps+1, V]
        assert_logits_close(ours, ref[len(prompt) - 1:])


def test_shuffled_pages_give_the_same_logits(case, contiguous_run):
    logits, generated = contiguous_run
    shuffled_logits, shuffled_generated = run_greedy(case, shuffled_pages(seed=3))
    assert shuffled_generated == generated
    np.testing.assert_allclose(shuffled_logits, logits, rtol=0, atol=1e-5)


def test_greedy_tokens_equal_hf_generate(case, contiguous_run):
    _, generated = contiguous_run
    for prompt, gen in zip(case.prompts, generated):
        with torch.no_grad():
            out = case.hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                   do_sample=False, max_new_tokens=len(gen), min_new_tokens=len(gen),
                                   eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == gen


def test_prefill_padding_and_batch_neighbours_do_not_leak(case, contiguous_run):
    """Prompt 0 alone (other rows empty) gives the logits it had packed with the others."""
    logits, _ = contiguous_run
    tokens, meta = prefill_metadata([case.prompts[0]], contiguous_pages())
    alone, _ = case.prefill(case.params, tokens, case.empty_cache(), meta)
    np.testing.assert_allclose(np.asarray(alone)[0], logits[0, 0], rtol=0, atol=1e-5)


def test_chunked_prefill_mixed_with_a_decode_token_matches_hf(case):
    """Sarathi-style step: the rest of a partly prefilled prompt plus another sequence's next
    token, each attending to its own cached context."""
    long, short = case.prompts[1], case.prompts[0]
    split, next_token, bucket = 5, 11, 16
    # The third prompt only keeps the prefill's compiled shapes; rows 0 and 1 continue.
    tokens, meta = prefill_metadata([long[:split], short, case.prompts[2]], contiguous_pages())
    pages = contiguous_pages()[:2]
    _, cache = case.prefill(case.params, tokens, case.empty_cache(), meta)

    rest = long[split:]
    positions = [*range(split, len(long)), len(short)]
    token_seq = [0] * len(rest) + [1]
    slots = [slot(pages[s], p) for s, p in zip(token_seq, positions)]
    pad = bucket - len(positions)
    meta = ChunkedMetadata(
        positions=jnp.array(positions + [0] * pad, jnp.int32),
        token_seq=jnp.array(token_seq + [-1] * pad, jnp.int32),
        slot_mapping=jnp.array(slots + [NOWHERE] * pad, jnp.int32),
        block_tables=jnp.array(pages, jnp.int32),
        last_token_idx=jnp.array([len(rest) - 1, len(rest)], jnp.int32))
    chunk = jnp.array(rest + [next_token] + [0] * pad, jnp.int32)
    logits, _ = case.chunked(case.params, chunk, cache, meta)
    ref = np.stack([hf_logits(case.hf, long)[-1], hf_logits(case.hf, short + [next_token])[-1]])
    assert_logits_close(np.asarray(logits), ref)
