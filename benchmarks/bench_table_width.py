"""Decode step time with block tables padded to one width against tables bucketed by the
longest row, alternating in one process (so machine noise hits both alike).

    python benchmarks/bench_table_width.py --model opt-125m --rounds 9
    python benchmarks/bench_table_width.py --model opt-tiny --rounds 31

The XLA attention's decode loop stops at the longest live row, so a table padded to the
request maximum should cost nothing; this checks it, at batch 1 and 8 and contexts from 32 to
1024 tokens, with `--max-context` the request maximum (tables are that many pages wide).
Prints the median step ms per (batch, context) for each layout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--contexts", default="32,256,1024")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dsjax.executor.batch import DecodeRow, SamplingRow
    from dsjax.executor.kernels import get_attention_backend
    from dsjax.executor.parallel import single_instance_spec
    from dsjax.executor.runner import ModelRunner
    from dsjax.models.registry import config_from_name
    from dsjax.models.weights import dummy_params
    from dsjax.sampling_params import SamplingParams

    cfg, dtype, page = config_from_name(args.model), jnp.dtype(args.dtype), 16
    max_pages = -(-args.max_context // page)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    spec = single_instance_spec("colocated", [jax.devices()[0]])
    runners = {}
    for layout in ("fixed", "bucketed"):
        runner = ModelRunner(spec, cfg, lambda sh: dummy_params(cfg, dtype, 0, sh), dtype=dtype,
                             num_pages=max(batches) * max_pages + 8, page_size=page,
                             attention=get_attention_backend("xla"),
                             max_batch_size=max(batches), max_tokens_per_batch=256,
                             max_blocks_per_request=max_pages)
        if layout == "bucketed":
            runner.fixed_table_width = 0
        runners[layout] = runner
    greedy = SamplingRow(SamplingParams(temperature=0, max_tokens=1), 0, 0)

    def rows(b, ctx):
        n = -(-(ctx + 1) // page)
        return [DecodeRow(5, ctx, tuple(range(i * max_pages, i * max_pages + n)), greedy)
                for i in range(b)]

    cases = [(b, c) for b in batches for c in contexts]
    for runner in runners.values():   # compile every shape first
        for case in cases:
            runner.decode(rows(*case))
    times = {(name, case): [] for name in runners for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            for name, runner in runners.items():
                batch = rows(*case)
                start = time.perf_counter()
                runner.decode(batch)
                times[name, case].append(time.perf_counter() - start)
    print(f"# {args.model} {dtype.name}, tables {max_pages} pages wide (fixed) or bucketed; "
          f"median of {args.rounds} alternating rounds, ms per decode step")
    print("| batch | context | fixed | bucketed | fixed / bucketed |")
    print("|---|---|---|---|---|")
    for b, c in cases:
        fixed = statistics.median(times["fixed", (b, c)])
        bucketed = statistics.median(times["bucketed", (b, c)])
        print(f"| {b} | {c} | {1e3 * fixed:.2f} | {1e3 * bucketed:.2f} | {fixed / bucketed:.2f} |")


if __name__ == "__main__":
    main()
