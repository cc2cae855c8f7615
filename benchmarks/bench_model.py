"""Prefill tokens/s and decode step time vs batch size for one OPT size, beside their floors.

    python benchmarks/bench_model.py --model opt-125m --dtype float32
    python benchmarks/bench_model.py --model opt-13b --dtype bfloat16        # on a GPU

Decode batches run as the engine pads them: 5 rows as 6, 7 as 8, past 8 rows to a power of two.

Floors: a decode step reads every weight once, so it takes >= weight bytes / memory bandwidth;
a prefill token costs >= 2 x params FLOPs, so tokens/s <= peak FLOP/s / (2 x params). Bandwidth
and peak are measured here (copy and matmul kernels) unless given as arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    p.add_argument("--context", type=int, default=512, help="tokens per sequence in decode")
    p.add_argument("--prefill-tokens", default="256,1024,2048")
    p.add_argument("--prompt-len", type=int, default=256, help="length of each packed prompt")
    p.add_argument("--bandwidth-gbs", type=float,
                   help="memory read bandwidth (default: measured by summing an array)")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s (default: measured matmul)")
    p.add_argument("--attention-backend", default="auto")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks._common import (measure_bandwidth, measure_matmul_flops,
                                    measure_read_bandwidth, timed)
    from dsjax.executor.batch import DecodeRow, PrefillRow, SamplingRow
    from dsjax.executor.kernels import get_attention_backend
    from dsjax.executor.parallel import single_instance_spec
    from dsjax.executor.runner import ModelRunner
    from dsjax.sampling_params import SamplingParams
    from dsjax.models.registry import config_from_name
    from dsjax.models.weights import dummy_params

    cfg = config_from_name(args.model)
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    # Decode reads weights and KV and writes little, so its floors use the read bandwidth; the
    # copy figure (read + write) is printed beside it for comparison with older runs.
    copy_bw = measure_bandwidth(device)
    bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_read_bandwidth(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measure_matmul_flops(dtype,
                                                                                  device=device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    page = 16
    pages_per_seq = -(-(args.context + 1) // page)
    num_pages = max(batches) * pages_per_seq + 8
    spec = single_instance_spec("colocated", [device])
    runner = ModelRunner(spec, cfg, lambda sh: dummy_params(cfg, dtype, 0, sh), dtype=dtype,
                         num_pages=num_pages, page_size=page,
                         attention=get_attention_backend(args.attention_backend),
                         max_batch_size=max(batches), max_tokens_per_batch=max(
                             int(t) for t in args.prefill_tokens.split(",")),
                         max_blocks_per_request=pages_per_seq)
    greedy = SamplingRow(SamplingParams(temperature=0, max_tokens=1), 0, 0)
    weight_bytes = cfg.num_params() * dtype.itemsize
    print(f"# {args.model} {dtype.name} on {device.device_kind} ({device.platform}); "
          f"read bandwidth {bw / 1e9:.1f} GB/s (copy {copy_bw / 1e9:.1f}), peak {peak / 1e12:.2f} TFLOP/s, "
          f"weights {weight_bytes / 1e9:.2f} GB\n")

    print("| prefill tokens | prompts | tokens/s | floor tokens/s | % of floor |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for total in [int(t) for t in args.prefill_tokens.split(",")]:
        n = max(1, total // args.prompt_len)
        rows = [PrefillRow(tuple(int(t) for t in rng.integers(4, 50000, args.prompt_len)),
                           tuple((i * pages_per_seq + j) % num_pages
                                 for j in range(-(-args.prompt_len // page))), (greedy,))
                for i in range(n)]
        seconds = timed(lambda: runner.prefill(rows), warmup=1, iters=3)
        rate = n * args.prompt_len / seconds
        floor = peak / (2 * cfg.num_params())
        print(f"| {n * args.prompt_len} | {n} | {rate:,.0f} | {floor:,.0f} | {100 * rate / floor:.0f}% |")

    # A decode step must read the weights once and every row's K and V for every layer.
    kv_bytes_per_token = cfg.kv_bytes_per_token(dtype.itemsize)
    print("\n| decode batch | context | step ms | floor ms (weights / read bandwidth) | % of floor "
          "| floor ms ((weights + KV) / read bandwidth) | % of that floor |")
    print("|---|---|---|---|---|---|---|")
    for b in batches:
        rows = [DecodeRow(5, args.context, tuple(range(i * pages_per_seq, (i + 1) * pages_per_seq)),
                          greedy) for i in range(b)]
        seconds = timed(lambda: runner.decode(rows), warmup=2, iters=5)
        floor = weight_bytes / bw
        kv_floor = (weight_bytes + b * args.context * kv_bytes_per_token) / bw
        print(f"| {b} | {args.context} | {seconds * 1e3:.2f} | {floor * 1e3:.2f} | "
              f"{100 * floor / seconds:.0f}% | {kv_floor * 1e3:.2f} | "
              f"{100 * kv_floor / seconds:.0f}% |")


if __name__ == "__main__":
    main()
