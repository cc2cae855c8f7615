"""What writing host pages into a decode instance's cache costs, when tensor parallelism exceeds
the model's KV heads: pages with every cache head (each model KV head repeated, as the pool
holds them) against pages with each model KV head once (what a swap keeps on the host, and what
a stage actor sends), whose insert program repeats the heads.

    python benchmarks/bench_page_insert.py --model qwen2.5-0.5b --tp 4 --blocks 1,8,32,128

One stage's PagePool of the model's shape (its layers, KV heads and head dim; no weights), on
--tp of 8 virtual CPU devices. Each row: the median of --iters inserts of the same block ids,
host NumPy pages to pages written (device_put, the program, and waiting for it), the two forms
alternating after one of each that compiles.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--blocks", default="1,8,32,128", help="pages per insert")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=15)
    args = p.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8").strip()
    import jax
    import numpy as np

    from dsjax.executor.kv_cache import PagePool, padded_pages
    from dsjax.executor.parallel import stage_mesh
    from dsjax.models.registry import config_from_name

    config = config_from_name(args.model)
    repeat = config.kv_head_repeat(args.tp)
    cache_heads = config.cache_kv_heads(args.tp)
    blocks = [int(b) for b in args.blocks.split(",")]
    pool = PagePool(stage_mesh(jax.devices()[:args.tp]), config.num_hidden_layers,
                    max(blocks) + 1, args.block_size, cache_heads, config.head_dim, np.float32)
    print(f"{args.model}: {config.num_hidden_layers} layers, {cache_heads // repeat} KV heads "
          f"of {config.head_dim}, TP {args.tp}: the cache holds each head {repeat} times\n")
    print("| pages | KB a page, every cache head | every cache head ms | each head once ms | "
          "once / every |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in blocks:
        ids = list(range(n))
        once = rng.standard_normal((config.num_hidden_layers, n, args.block_size,
                                    cache_heads // repeat, config.head_dim), np.float32)
        every = np.repeat(once, repeat, axis=3)
        forms = {"every": padded_pages(every, n), "once": padded_pages(once, n)}
        took = {name: [] for name in forms}
        for i in range(args.iters + 1):
            for name, pages in forms.items():
                start = time.perf_counter()
                pool.insert(ids, pages, pages)
                jax.block_until_ready((pool.k, pool.v))
                if i:   # the first of each compiles
                    took[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) for name, t in took.items()}
        print(f"| {n} | {2 * every[:, :1].nbytes / 1e3:.0f} | {ms['every']:.2f} | "
              f"{ms['once']:.2f} | {ms['once'] / ms['every']:.2f} |")


if __name__ == "__main__":
    main()
