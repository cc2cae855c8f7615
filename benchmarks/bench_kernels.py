"""Benchmark dsjax's Pallas attention kernels against cuDNN, XLA and JAX's shipped Pallas ops.

    python benchmarks/bench_kernels.py              # on a GPU: full sweep, markdown to stdout
    python benchmarks/bench_kernels.py --smoke      # anywhere: tiny shapes, kernels interpreted

One run measures the device's copy bandwidth and bf16 matmul rate first, then reports every
kernel as TFLOP/s (prefill) or GB/s (decode) and as a fraction of those measured peaks.
Each competitor runs in its own try/except and shows "n/a: reason" when it cannot run, so an
unattended run always finishes. The last column compares our output with XLA's on the same
inputs (a correctness check on real hardware).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.executor.kernels import paged_decode_attention, prefill_attention
from dsjax.models.attention import DecodeMetadata, PrefillMetadata, XLAAttention


@dataclasses.dataclass
class Timing:
    seconds: float | None
    note: str = ""
    out: jax.Array | None = None


def time_call(make: Callable[[], Callable[[], jax.Array]], reps: int) -> Timing:
    """Build, compile and warm up `make()`, then the median of `reps` timed calls."""
    try:
        fn = make()
        out = jax.block_until_ready(fn())
        jax.block_until_ready(fn())
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples.append(time.perf_counter() - start)
        return Timing(statistics.median(samples), out=out)
    except Exception as e:  # noqa: BLE001 - a failing competitor must not end the run
        reason = (str(e).strip().splitlines() or [""])[0][:70]
        return Timing(None, f"n/a: {type(e).__name__}: {reason}")


# ------------------------------------------------------------------ peaks

def measure_peaks(smoke: bool, reps: int) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s)."""
    n = (1 << 20) if smoke else (1 << 30)  # elements of bf16: 2 MiB or 2 GiB
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * 2)
    copy_t = time_call(lambda: lambda: copy(x), reps)
    size = 256 if smoke else 8192
    a = jnp.ones((size, size), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    mm_t = time_call(lambda: lambda: matmul(a), reps)
    bandwidth = 2 * n * 2 / copy_t.seconds if copy_t.seconds else float("nan")
    flops = 2 * size ** 3 / mm_t.seconds if mm_t.seconds else float("nan")
    return bandwidth, flops


# ------------------------------------------------------------------ prefill

def mixed_lengths(rng, total: int, longest: int) -> list[int]:
    """Prompt lengths summing to `total`, drawn log-uniformly from [16, longest]."""
    lens = []
    while sum(lens) < total:
        n = int(np.exp(rng.uniform(np.log(16), np.log(longest))))
        lens.append(min(n, total - sum(lens)))
    return lens


def prefill_case(rng, lens, heads, head_dim, dtype):
    total = sum(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    seg = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    meta = PrefillMetadata(positions=jnp.asarray(pos), seq_ids=jnp.asarray(seg),
                           cu_seqlens=jnp.asarray(cu), slot_mapping=jnp.zeros(total, jnp.int32),
                           last_token_idx=jnp.asarray(cu[1:] - 1))
    q, k, v = (jnp.asarray(rng.standard_normal((total, heads, head_dim)), dtype)
               for _ in range(3))
    return q, k, v, meta


def to_padded(x, lens):
    """Packed [T, H, D] -> [B, max_len, H, D] (zeros after each prompt) for batched APIs."""
    longest = -(-max(lens) // 64) * 64
    cu = np.concatenate([[0], np.cumsum(lens)])
    idx = np.zeros((len(lens), longest), np.int32)
    valid = np.zeros((len(lens), longest), bool)
    for i, n in enumerate(lens):
        idx[i, :n] = np.arange(cu[i], cu[i] + n)
        valid[i, :n] = True
    return jnp.where(jnp.asarray(valid)[..., None, None], x[jnp.asarray(idx)], 0)


def from_padded(y, lens):
    return jnp.concatenate([y[i, :n] for i, n in enumerate(lens)])


def bench_prefill(args, rng, peak_flops) -> list[str]:
    rows = ["| tokens | prompts | ours | cuDNN | XLA | JAX mha | max abs diff vs XLA |",
            "|---|---|---|---|---|---|---|"]
    for total in args.prefill_tokens:
        lens = mixed_lengths(rng, total, min(total, args.longest_prompt))
        q, k, v, meta = prefill_case(rng, lens, args.heads, args.head_dim, args.dtype)
        flops = sum(4 * args.heads * args.head_dim * n * (n + 1) / 2 for n in lens)
        qp, kp, vp = (to_padded(x, lens) for x in (q, k, v))
        seq_lens = jnp.asarray(lens, jnp.int32)

        def ours():
            f = jax.jit(lambda q, k, v, m: prefill_attention(
                q, k, v, m, block_q=args.block_q, block_k=args.block_k,
                num_warps=args.num_warps, interpret=args.interpret))
            return lambda: f(q, k, v, meta)

        def sdpa(impl):
            def make():
                f = jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n,
                    implementation=impl))
                return lambda: from_padded(f(qp, kp, vp, seq_lens), lens)
            return make

        def jax_mha():
            from jax.experimental.pallas.ops.gpu.attention import mha
            padded = -(-total // 128) * 128
            pad = lambda x: jnp.pad(x, ((0, padded - total), (0, 0), (0, 0)))[None]  # noqa
            segs = jnp.pad(meta.seq_ids, (0, padded - total), constant_values=-1)[None]
            args_ = (pad(q), pad(k), pad(v), segs)
            f = jax.jit(lambda q, k, v, s: mha(q, k, v, s, sm_scale=args.head_dim ** -0.5,
                                               causal=True, interpret=args.interpret))
            return lambda: f(*args_)[0, :total]

        results = [time_call(m, args.reps) for m in (ours, sdpa("cudnn"), sdpa("xla"), jax_mha)]
        cells = [fmt_rate(r, flops / 1e12, "TFLOP/s", peak_flops / 1e12) for r in results]
        rows.append(f"| {total} | {len(lens)} | " + " | ".join(cells)
                    + f" | {max_diff(results[0], results[2])} |")
    return rows


# ------------------------------------------------------------------ decode

def decode_case(rng, batch, context, heads, head_dim, page_size, dtype):
    width = -(-context // page_size)
    num_pages = batch * width + 1
    shape = (1, num_pages, page_size, heads, head_dim)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    tables = jnp.asarray(rng.permutation(num_pages)[:batch * width].reshape(batch, width),
                         jnp.int32)
    lens = jnp.full((batch,), context, jnp.int32)
    meta = DecodeMetadata(positions=lens - 1, slot_mapping=jnp.zeros(batch, jnp.int32),
                          block_tables=tables, context_lens=lens)
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    return q, k_cache, v_cache, meta


def largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def bench_decode(args, rng, peak_bw) -> list[str]:
    rows = ["| batch | context | ours | JAX paged_attention | XLA gather | max abs diff vs XLA |",
            "|---|---|---|---|---|---|"]
    for batch in args.decode_batches:
        for context in args.decode_contexts:
            q, k_cache, v_cache, meta = decode_case(rng, batch, context, args.heads,
                                                    args.head_dim, args.page_size, args.dtype)
            itemsize = jnp.dtype(args.dtype).itemsize
            nbytes = 2 * batch * context * args.heads * args.head_dim * itemsize

            def ours():
                f = jax.jit(lambda q, kc, vc, m: paged_decode_attention(
                    q, kc, vc, 0, m.block_tables, m.context_lens, interpret=args.interpret))
                return lambda: f(q, k_cache, v_cache, meta)

            def jax_paged():
                from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
                # JAX's op wants [Hkv, P, S, D]; the transpose is made once, outside the timing.
                kp, vp = (jnp.transpose(c[0], (2, 0, 1, 3)) for c in (k_cache, v_cache))
                width = meta.block_tables.shape[1]
                splits = largest_pow2_divisor(width, 16)
                per_block = largest_pow2_divisor(width // splits, 8)
                f = jax.jit(lambda q, kp, vp, t, n: paged_attention(
                    q, kp, vp, t, n, k_splits=splits, pages_per_compute_block=per_block,
                    interpret=args.interpret))
                return lambda: f(q, kp, vp, meta.block_tables, meta.context_lens)

            def xla():
                f = jax.jit(lambda q, kc, vc, m: XLAAttention().decode(q, kc, vc, 0, m))
                return lambda: f(q, k_cache, v_cache, meta)

            results = [time_call(m, args.reps) for m in (ours, jax_paged, xla)]
            cells = [fmt_rate(r, nbytes / 1e9, "GB/s", peak_bw / 1e9) for r in results]
            rows.append(f"| {batch} | {context} | " + " | ".join(cells)
                        + f" | {max_diff(results[0], results[2])} |")
    return rows


# ------------------------------------------------------------------ report

def fmt_rate(result: Timing, work: float, unit: str, peak: float) -> str:
    if result.seconds is None:
        return result.note.replace("|", "/")
    rate = work / result.seconds
    return f"{rate:.3g} {unit} ({100 * rate / peak:.0f}%)"


def max_diff(a: Timing, b: Timing) -> str:
    if a.out is None or b.out is None:
        return "-"
    d = jnp.max(jnp.abs(a.out.astype(jnp.float32) - b.out.astype(jnp.float32)))
    return f"{float(d):.2g}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, kernels interpreted: checks the script runs (CPU is fine)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--heads", type=int, default=40, help="local query = KV heads (OPT-13B: 40)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, nargs="+",
                   default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--longest-prompt", type=int, default=2048)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--num-warps", type=int, default=8)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    args.interpret = jax.default_backend() != "gpu"
    if args.smoke:
        args.heads, args.head_dim, args.page_size = 2, 64, 8
        args.prefill_tokens, args.longest_prompt = [64], 48
        args.block_q = args.block_k = 16
        args.decode_batches, args.decode_contexts, args.reps = [2], [32], 2
    args.dtype = jnp.dtype(args.dtype)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    bandwidth, flops = measure_peaks(args.smoke, args.reps)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"dtype {args.dtype.name}, heads {args.heads}, head_dim {args.head_dim}"
          + (", kernels interpreted" if args.interpret else ""))
    print(f"measured peaks: copy {bandwidth / 1e9:.3g} GB/s (read + write), "
          f"bf16 matmul {flops / 1e12:.3g} TFLOP/s\n")
    print("## Prefill (causal, packed mixed-length prompts; % of measured matmul peak)\n")
    print("\n".join(bench_prefill(args, rng, flops)))
    print("\n## Decode (paged; K+V bytes read; % of measured copy bandwidth)\n")
    print("\n".join(bench_decode(args, rng, bandwidth)))
    print("\nTargets (H100, bf16): prefill >= cuDNN at >= 2k tokens; "
          "decode >= 80% of bandwidth at batch >= 32, context >= 1k.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
