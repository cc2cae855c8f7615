"""Pallas attention kernels (interpret mode on CPU) against a float64 NumPy reference.

Inputs are fresh random draws each run; the seed is in every failure message so a failure
can be replayed with DSJAX_KERNEL_SEED=<seed>. Interpret mode fills kernel outputs with NaN
before the kernel runs (checked below), so an element a kernel forgets to write fails the
finite check of `assert_close`.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import Mesh, PartitionSpec as P

from dsjax.executor.kernels import (PallasAttention, combine_splits, get_attention_backend,
                           paged_decode_attention, prefill_attention)
from dsjax.executor.kernels._compat import head_dim_chunks
from dsjax.models.attention import DecodeMetadata, PrefillMetadata, XLAAttention

SEED = int(os.environ.get("DSJAX_KERNEL_SEED", time.time_ns() % 2**31))
# Max |kernel - reference| / max |reference|. Reference runs in float64 on the same (rounded)
# inputs, so the bound covers only the kernel's own rounding: f32 accumulation, and for half
# types the probabilities rounded to the input dtype before p @ V plus the rounded output.
TOLERANCE = {jnp.float32: 2e-6, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, abs(hash(request.node.name)) % 2**31])


def _where(test: str) -> str:
    return f"{test} (DSJAX_KERNEL_SEED={SEED})"


def assert_close(out, ref, dtype, what: str, mask=None):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.isfinite(out).all(), f"non-finite values in {_where(what)}"
    if mask is not None:
        out, ref = out[mask], ref[mask]
    err = np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-6)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]} in {_where(what)}"


def rounded(rng, shape, dtype):
    """Random normal values already rounded to dtype, and the same values in float64."""
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def softmax_attend(q, k, v):
    """q [H, D], k/v [L, H, D] in float64 -> [H, D]."""
    scores = np.einsum("hd,lhd->hl", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.einsum("hl,lhd->hd", w / w.sum(axis=-1, keepdims=True), v)


def repeat_heads(x, num_heads):
    return np.repeat(x, num_heads // x.shape[1], axis=1)


# ---------------------------------------------------------------- prefill

def packed_metadata(lens, num_tokens):
    """Metadata for prompts of `lens` packed in order on a token axis padded to num_tokens."""
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    seg = np.full(num_tokens, -1, np.int32)
    pos = np.zeros(num_tokens, np.int32)
    for i, n in enumerate(lens):
        seg[cu[i]:cu[i + 1]] = i
        pos[cu[i]:cu[i + 1]] = np.arange(n)
    slots = np.where(seg >= 0, np.arange(num_tokens), 1 << 30).astype(np.int32)
    return PrefillMetadata(positions=jnp.asarray(pos), seq_ids=jnp.asarray(seg),
                           cu_seqlens=jnp.asarray(cu), slot_mapping=jnp.asarray(slots),
                           last_token_idx=jnp.asarray(cu[1:] - 1))


def prefill_reference(q, k, v, lens):
    out = np.zeros_like(q)
    k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
    start = 0
    for n in lens:
        for t in range(start, start + n):
            out[t] = softmax_attend(q[t], k[start:t + 1], v[start:t + 1])
        start += n
    return out


def random_prompt_lengths(rng, budget, block):
    """1, an exact block multiple, then random lengths (many not block multiples), shuffled."""
    lens = [1, block]
    while sum(lens) < budget - 2:
        lens.append(int(rng.integers(1, min(2 * block + 5, budget - sum(lens)))))
    rng.shuffle(lens)
    return lens


@pytest.mark.parametrize("dtype,head_dim,heads,kv_heads", [
    (jnp.float32, 80, 2, 2),
    (jnp.float32, 64, 4, 2),     # grouped-query heads
    (jnp.bfloat16, 64, 2, 2),
    (jnp.float16, 128, 2, 1),
])
def test_prefill_matches_reference(rng, dtype, head_dim, heads, kv_heads):
    block, num_tokens = 16, 88  # token axis not a multiple of the block; tail is padding
    lens = random_prompt_lengths(rng, num_tokens - 5, block)
    real = sum(lens)
    q, q64 = rounded(rng, (num_tokens, heads, head_dim), dtype)
    k, k64 = rounded(rng, (num_tokens, kv_heads, head_dim), dtype)
    v, v64 = rounded(rng, (num_tokens, kv_heads, head_dim), dtype)
    # Padding tokens hold NaN: they must reach neither real rows nor padding rows.
    q, k, v = (x.at[real:].set(jnp.nan) for x in (q, k, v))
    out = prefill_attention(q, k, v, packed_metadata(lens, num_tokens), block_q=block,
                            block_k=block, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = prefill_reference(q64[:real], k64[:real], v64[:real], lens)
    assert_close(out[:real], ref, dtype, f"prefill lens={lens}")
    assert np.all(np.asarray(out[real:], np.float32) == 0), _where("padding rows must be 0")


def test_prefill_uneven_blocks_and_single_prompt(rng):
    """block_q != block_k, one prompt filling the whole axis: the causal skip bounds must hold."""
    num_tokens, heads, head_dim = 48, 1, 64
    q, q64 = rounded(rng, (num_tokens, heads, head_dim), jnp.float32)
    k, k64 = rounded(rng, (num_tokens, heads, head_dim), jnp.float32)
    v, v64 = rounded(rng, (num_tokens, heads, head_dim), jnp.float32)
    meta = packed_metadata([num_tokens], num_tokens)
    ref = prefill_reference(q64, k64, v64, [num_tokens])
    for bq, bk in ((32, 16), (16, 32)):
        out = prefill_attention(q, k, v, meta, block_q=bq, block_k=bk, interpret=True)
        assert_close(out, ref, jnp.float32, f"prefill block_q={bq} block_k={bk}")


# ---------------------------------------------------------------- decode

def paged_case(rng, lens, dtype, *, page_size=8, width=6, heads=2, kv_heads=2, head_dim=64,
               layers=2, layer=1):
    """A cache whose every slot not holding a live token is NaN (other layer, unused pages,
    page tails past the length), shuffled block tables, unused table entries pointing anywhere."""
    num_pages = len(lens) * width + 3
    shape = (layers, num_pages, page_size, kv_heads, head_dim)
    k_vals, k64 = rounded(rng, shape, dtype)
    v_vals, v64 = rounded(rng, shape, dtype)
    live = np.zeros(shape[:3], bool)
    tables = rng.permutation(num_pages)[:len(lens) * width].reshape(len(lens), width)
    for b, n in enumerate(lens):
        for t in range(n):
            live[layer, tables[b, t // page_size], t % page_size] = True
        used = -(-n // page_size)
        tables[b, used:] = rng.integers(-1, num_pages, width - used)  # junk, -1 included
    mask = jnp.asarray(live[..., None, None])
    k_cache = jnp.where(mask, k_vals, jnp.nan).astype(dtype)
    v_cache = jnp.where(mask, v_vals, jnp.nan).astype(dtype)
    q, q64 = rounded(rng, (len(lens), heads, head_dim), dtype)
    ref = np.zeros_like(q64)
    for b, n in enumerate(lens):
        if n:
            rows = [(tables[b, t // page_size], t % page_size) for t in range(n)]
            keys = np.stack([k64[layer, p, s] for p, s in rows])
            vals = np.stack([v64[layer, p, s] for p, s in rows])
            ref[b] = softmax_attend(q64[b], repeat_heads(keys, heads), repeat_heads(vals, heads))
    meta = DecodeMetadata(positions=jnp.asarray(np.maximum(np.array(lens) - 1, 0), jnp.int32),
                          slot_mapping=jnp.zeros(len(lens), jnp.int32),
                          block_tables=jnp.asarray(tables, jnp.int32),
                          context_lens=jnp.asarray(lens, jnp.int32))
    return q, k_cache, v_cache, meta, ref


def random_context_lengths(rng, page_size, width):
    """0 (padding row), 1, exactly one page, the full table, and random lengths."""
    fixed = [0, 1, page_size, page_size * width]
    return fixed + [int(n) for n in rng.integers(2, page_size * width, 3)]


@pytest.mark.parametrize("dtype,head_dim,splits,kv_heads", [
    (jnp.float32, 80, 1, 2),
    (jnp.float32, 64, 2, 1),       # GQA: 2 query heads share a KV head
    (jnp.float32, 128, None, 2),   # automatic split count
    (jnp.bfloat16, 128, 3, 2),     # uneven splits, some empty
    (jnp.float16, 64, 2, 2),
])
def test_decode_matches_reference(rng, dtype, head_dim, splits, kv_heads):
    lens = random_context_lengths(rng, page_size=8, width=6)
    q, k_cache, v_cache, meta, ref = paged_case(rng, lens, dtype, head_dim=head_dim,
                                                kv_heads=kv_heads)
    out = paged_decode_attention(q, k_cache, v_cache, jnp.int32(1), meta.block_tables,
                                 meta.context_lens, pages_per_block=2, num_splits=splits,
                                 interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype, f"decode lens={lens} splits={splits}")
    assert np.all(np.asarray(out[0], np.float32) == 0), _where("context_len 0 must give 0")


def test_combine_splits_is_exact_softmax_merge(rng):
    scores = rng.standard_normal((2, 1, 12)) * 3
    values = rng.standard_normal((2, 1, 12, 4))
    full = np.einsum("bhl,bhld->bhd", np.exp(scores) / np.exp(scores).sum(-1, keepdims=True),
                     values)
    parts = np.split(np.arange(12), [5, 5, 9])  # includes an empty split
    lse = np.full((2, 1, 4), -np.inf)
    o = np.zeros((2, 1, 4, 4))
    for s, idx in enumerate(parts):
        if len(idx):
            w = np.exp(scores[..., idx])
            lse[..., s] = np.log(w.sum(-1))
            o[:, :, s] = np.einsum("bhl,bhld->bhd", w / w.sum(-1, keepdims=True), values[:, :, idx])
    lse[1] = -np.inf  # row 1: every split empty -> zeros, not NaN
    merged = np.asarray(combine_splits(jnp.asarray(o, jnp.float32), jnp.asarray(lse, jnp.float32)))
    np.testing.assert_allclose(merged[0], full[0], rtol=1e-5, atol=1e-6, err_msg=_where("combine"))
    assert np.all(merged[1] == 0), _where("all-empty row must combine to 0")


# ---------------------------------------------------------------- backend

def test_backend_selection_and_hashing():
    assert isinstance(get_attention_backend("auto"), XLAAttention)  # CPU
    assert isinstance(get_attention_backend("xla"), XLAAttention)
    pallas = get_attention_backend("pallas")
    assert pallas == PallasAttention(interpret=True) and pallas.interpret
    assert get_attention_backend("pallas", interpret=False).interpret is False
    assert hash(pallas) == hash(PallasAttention(interpret=True))
    assert hash(pallas) != hash(PallasAttention(interpret=True, decode_splits=2))
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):
        get_attention_backend("triton")


def test_head_dim_chunks():
    assert head_dim_chunks(80) == ((0, 64), (64, 16))
    assert head_dim_chunks(128) == ((0, 128),)
    assert head_dim_chunks(96) == ((0, 64), (64, 32))
    with pytest.raises(ValueError, match="head_dim=72"):
        head_dim_chunks(72)


def test_backend_write_kv_poisoned_cache(rng):
    """Written slots hold the new values, every other slot keeps its NaN poison, padding slots
    (negative or past the cache) write nowhere."""
    layers, pages, page_size, heads, dim = 2, 4, 4, 2, 16
    cache = jnp.full((layers, pages, page_size, heads, dim), jnp.nan, jnp.float32)
    slots = np.array([5, 0, 15, -1, pages * page_size + 3], np.int32)
    k = jnp.asarray(rng.standard_normal((5, heads, dim)), jnp.float32)
    k_out, v_out = PallasAttention(interpret=True).write_kv(cache, cache, 1, k, -k,
                                                             jnp.asarray(slots))
    k_out = np.asarray(k_out)
    for i, s in enumerate(slots[:3]):
        np.testing.assert_array_equal(k_out[1, s // page_size, s % page_size], np.asarray(k[i]))
        np.testing.assert_array_equal(np.asarray(v_out)[1, s // page_size, s % page_size],
                                      -np.asarray(k[i]))
    assert np.isfinite(k_out).sum() == 3 * heads * dim, "a padding slot was written"


def test_interpret_mode_poisons_unwritten_outputs():
    """The premise that makes the finite checks above catch unwritten output elements."""
    def writes_half(x_ref, o_ref):
        o_ref[pl.ds(0, 4)] = x_ref[pl.ds(0, 4)]
    out = pl.pallas_call(writes_half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                         interpret=True)(jnp.ones(8))
    assert np.all(np.asarray(out[:4]) == 1) and not np.isfinite(np.asarray(out[4:])).any()


def test_prefill_under_shard_map(rng):
    """Heads split over a 2-device mesh (tensor parallelism), shard_map with its default
    check_vma: the kernel sees only its local heads."""
    lens = [7, 20]
    meta = packed_metadata(lens, 32)
    q, q64 = rounded(rng, (32, 4, 64), jnp.float32)
    k, k64 = rounded(rng, (32, 4, 64), jnp.float32)
    v, v64 = rounded(rng, (32, 4, 64), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    spec = P(None, "tp", None)
    backend = PallasAttention(interpret=True, prefill_block_q=16, prefill_block_k=16)
    fn = jax.shard_map(backend.prefill, mesh=mesh, in_specs=(spec, spec, spec, P()),
                       out_specs=spec)
    out = jax.jit(fn)(q, k, v, meta)
    assert_close(out[:27], prefill_reference(q64[:27], k64[:27], v64[:27], lens), jnp.float32,
                 "prefill under shard_map")


def test_backend_in_layer_scan_and_shard_map(rng):
    """The runtime's calling pattern: traced layer index inside lax.scan, heads split over a
    2-device mesh with shard_map. Must agree with the XLA backend."""
    lens = [3, 17, 8]
    q, k_cache, v_cache, meta, _ = paged_case(rng, lens, jnp.float32, heads=4, kv_heads=4,
                                              layers=3, layer=2)
    finite = lambda c: jnp.nan_to_num(c, nan=0.0)  # noqa: E731 - XLA reference reads all pages
    k_cache, v_cache = finite(k_cache), finite(v_cache)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    heads_spec = P(None, "tp", None)
    cache_spec = P(None, None, None, "tp", None)

    def run(backend):
        def per_device(q, kc, vc, meta):
            def step(carry, layer):
                return carry + backend.decode(q, kc, vc, layer, meta), None
            return jax.lax.scan(step, jnp.zeros_like(q), jnp.arange(3))[0]
        fn = jax.shard_map(per_device, mesh=mesh,
                           in_specs=(heads_spec, cache_spec, cache_spec, P()),
                           out_specs=heads_spec)
        return jax.jit(fn)(q, k_cache, v_cache, meta)

    out = run(PallasAttention(interpret=True, decode_pages_per_block=2, decode_splits=2))
    ref = np.asarray(run(XLAAttention()), np.float64)
    assert_close(out, ref, jnp.float32, "decode in scan + shard_map")


@pytest.mark.parametrize("head_dim", [80, 128])
def test_kernels_lower_to_triton_for_gpu(rng, head_dim):
    """Lowering for CUDA on a CPU-only machine runs the real Pallas->Triton lowering: catches
    tiles that are not powers of two, unsupported indexing and dtype mistakes without a GPU."""
    bf16 = jnp.bfloat16
    lens = [5, 60, 33]
    meta = packed_metadata(lens, 128)
    qkv = jax.ShapeDtypeStruct((128, 4, head_dim), bf16)
    pallas = PallasAttention()
    lowered = jax.jit(pallas.prefill).trace(qkv, qkv, qkv, meta).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in lowered, "prefill did not lower to a Triton call"
    q, k_cache, v_cache, dmeta, _ = paged_case(rng, [1, 20], bf16, head_dim=head_dim)
    lowered = jax.jit(pallas.decode).trace(q, k_cache, v_cache, jnp.int32(1), dmeta).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in lowered, "decode did not lower to a Triton call"


def test_benchmark_smoke_run(capsys):
    """benchmarks/bench_kernels.py must keep running unattended: the smoke configuration
    produces both tables, and our kernels (interpreted here) measure instead of failing."""
    import runpy
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    bench = runpy.run_path(str(script))
    assert bench["main"](["--smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    prefill_row = next(line for line in lines if line.startswith("| 64 |"))
    decode_row = next(line for line in lines if line.startswith("| 2 | 32 |"))
    for row in (prefill_row, decode_row):
        ours = row.split("|")[3]  # after the two shape columns
        assert "/s" in ours, f"our kernel did not run in the benchmark: {row}"


def test_backend_drives_opt_model_like_xla(rng):
    """End to end through the OPT family's module (opt-tiny, layer scan): a prefill of two packed
    prompts then one decode step give the same logits and caches with either backend."""
    from dsjax.models.registry import config_from_name

    config = config_from_name("opt-tiny")
    page_size, num_pages, bucket = 4, 10, 24
    lens = [5, 11]
    tables = np.array([[3, 7, 0, 0], [9, 1, 5, 2]], np.int32)  # shuffled pages
    slots = np.full(bucket, num_pages * page_size, np.int32)  # padding writes nowhere
    start = 0
    for b, n in enumerate(lens):
        t = np.arange(n)
        slots[start:start + n] = tables[b, t // page_size] * page_size + t % page_size
        start += n
    prefill_meta = packed_metadata(lens, bucket)
    prefill_meta = prefill_meta.replace(slot_mapping=jnp.asarray(slots))
    ids = jnp.asarray(rng.integers(4, config.vocab_size, bucket), jnp.int32)
    shape = (config.num_hidden_layers, num_pages, page_size, config.cache_kv_heads(),
             config.head_dim)
    cache = (jnp.zeros(shape), jnp.zeros(shape))
    new = np.array(lens)
    decode_meta = DecodeMetadata(
        positions=jnp.asarray(new, jnp.int32),
        slot_mapping=jnp.asarray(tables[[0, 1], new // page_size] * page_size + new % page_size),
        block_tables=jnp.asarray(tables), context_lens=jnp.asarray(new + 1, jnp.int32))
    next_ids = jnp.asarray(rng.integers(4, config.vocab_size, 2), jnp.int32)
    params = {"params": config.abstract_params()}
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype), params)

    def run(backend):
        def step(mode, tokens, kv, meta):
            model = config.module(backend, mode)
            hidden, kv = model.apply(params, tokens, kv, meta)
            last = hidden if mode == "decode" else hidden[meta.last_token_idx]
            return model.apply(params, last, method="logits"), kv
        first, kv = jax.jit(step, static_argnums=0)("prefill", ids, cache, prefill_meta)
        second, kv = jax.jit(step, static_argnums=0)("decode", next_ids, kv, decode_meta)
        return first, second, kv

    ours = run(PallasAttention(interpret=True, prefill_block_q=16, prefill_block_k=16,
                               decode_pages_per_block=2))
    ref = run(XLAAttention())
    for name, a, b in zip(("prefill logits", "decode logits"), ours[:2], ref[:2]):
        assert_close(a, np.asarray(b, np.float64), jnp.float32, f"OPTModel {name}")
    for a, b in zip(ours[2], ref[2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                   err_msg=_where("KV cache after prefill + decode"))


def test_self_check_passes_the_kernels_and_catches_a_wrong_backend():
    """On a GPU, "auto" uses the kernels only after this check on the device; here the
    interpreted kernels pass it, and a backend with an off-by-one context fails it."""
    from dsjax.executor.kernels.backend import checked_or_reference, self_check
    assert self_check(PallasAttention(interpret=True), num_heads=2, head_dim=80) is None

    class DropsNewestToken(XLAAttention):
        def decode(self, q, k_cache, v_cache, layer, meta, window=None):
            return super().decode(q, k_cache, v_cache, layer,
                                  meta.replace(context_lens=meta.context_lens - 1))
    problem = self_check(DropsNewestToken())
    assert problem is not None and "decode differs" in problem
    with pytest.warns(RuntimeWarning, match="failed their start-up check"):
        assert isinstance(checked_or_reference(DropsNewestToken(), 4, 4, 64, 16, jnp.float32),
                          XLAAttention)
