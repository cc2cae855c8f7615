"""Prefill step time, whole prompts through the paged program (every key read from the pages,
the CPU default: `runner.platform_prefills_paged`) against the packed prefill program.

    python benchmarks/bench_prefill_paged.py --model opt-125m

Both paths run in one process on one runner, alternating round by round, so the machine's
drift falls on both alike (a first round, untimed, compiles); prints the median step ms of
each and their ratio, per batch of prompts (length x count). Compile times: profile_warmup.py.
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
    p.add_argument("--batches", default="16x1,16x8,64x4,100x1,256x4,1000x1",
                   help="prompt length x prompts, per step")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsjax.executor.batch import PrefillRow, SamplingRow
    from dsjax.executor.kernels import get_attention_backend
    from dsjax.executor.parallel import single_instance_spec
    from dsjax.executor.runner import ModelRunner
    from dsjax.models.registry import config_from_name
    from dsjax.models.weights import dummy_params
    from dsjax.sampling_params import SamplingParams

    cfg = config_from_name(args.model)
    batches = [tuple(int(x) for x in b.split("x")) for b in args.batches.split(",")]
    page = 16
    pages = max(k * -(-n // page) for n, k in batches)
    runner = ModelRunner(single_instance_spec("prefill", jax.devices()[:1]), cfg,
                         lambda sh: dummy_params(cfg, jnp.float32, 0, sh), dtype=jnp.float32,
                         num_pages=pages + 8, page_size=page,
                         attention=get_attention_backend("auto"), max_batch_size=256,
                         max_tokens_per_batch=max(n * k for n, k in batches),
                         max_blocks_per_request=max(-(-n // page) for n, _ in batches))
    greedy = SamplingRow(SamplingParams(temperature=0, max_tokens=1), 0, 0)
    rng = np.random.default_rng(0)

    def rows(n, k):
        out, at = [], 0
        for _ in range(k):
            used = -(-n // page)
            out.append(PrefillRow(tuple(int(t) for t in rng.integers(4, 50000, n)),
                                  tuple(range(at, at + used)), (greedy,)))
            at += used
        return out

    paths = {"paged": True, "packed": False}
    times = {(b, path): [] for b in batches for path in paths}
    for r in range(args.rounds + 1):
        for b in batches:
            for path, paged in paths.items():
                runner.prefill_reads_pages = paged
                batch = rows(*b)
                start = time.perf_counter()
                runner.prefill(batch)
                if r:
                    times[b, path].append(time.perf_counter() - start)
    print(f"# {args.model} float32 on {jax.devices()[0].device_kind}; {args.rounds} rounds, "
          f"alternating\n")
    print("| prompts (length x count) | packed ms | paged ms | paged / packed |")
    print("|---|---|---|---|")
    for b in batches:
        packed, paged = (statistics.median(times[b, path]) * 1e3 for path in ("packed", "paged"))
        print(f"| {b[0]} x {b[1]} | {packed:.1f} | {paged:.1f} | {paged / packed:.2f} |")


if __name__ == "__main__":
    main()
