"""Where a decode step's device time goes: XLA ops of ModelRunner.decode, summed per op name.

    python benchmarks/profile_decode_step.py --model opt-125m --batch 1 --context 16

Runs the step a few times, then traces --steps more with jax.profiler (a Perfetto trace in
--trace-dir) and prints the --top op names by time per step, with how often each runs a step.
Host frames (Python, dispatch) appear too, prefixed with '$'.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace-dir", default="/tmp/dsjax-decode-trace")
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

    cfg, dtype = config_from_name(args.model), jnp.dtype("float32")
    page = 16
    pages_per_seq = -(-(args.context + 1) // page)
    runner = ModelRunner(single_instance_spec("colocated", [jax.devices()[0]]), cfg,
                         lambda sh: dummy_params(cfg, dtype, 0, sh), dtype=dtype,
                         num_pages=args.batch * pages_per_seq + 8, page_size=page,
                         attention=get_attention_backend("auto"),
                         max_batch_size=max(args.batch, 8), max_tokens_per_batch=256,
                         max_blocks_per_request=pages_per_seq)
    greedy = SamplingRow(SamplingParams(temperature=0, max_tokens=1), 0, 0)
    rows = [DecodeRow(5, args.context, tuple(range(i * pages_per_seq, (i + 1) * pages_per_seq)),
                      greedy) for i in range(args.batch)]
    for _ in range(3):
        runner.decode(rows)
    started = time.perf_counter()
    for _ in range(args.steps):
        runner.decode(rows)
    print(f"# {args.model}, batch {args.batch}, context {args.context}: "
          f"{(time.perf_counter() - started) / args.steps * 1e3:.1f} ms a step untraced")
    jax.profiler.start_trace(args.trace_dir, create_perfetto_trace=True)
    for _ in range(args.steps):
        runner.decode(rows)
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(f"{args.trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    total, count = collections.Counter(), collections.Counter()
    for event in json.load(gzip.open(trace))["traceEvents"]:
        if event.get("ph") == "X":
            total[event["name"]] += event["dur"]
            count[event["name"]] += 1
    print("| ms a step | per step | op |\n|---|---|---|")
    for name, us in total.most_common(args.top):
        print(f"| {us / args.steps / 1e3:.2f} | {count[name] / args.steps:.1f} | {name[:100]} |")


if __name__ == "__main__":
    main()
