"""`python -m dsjax.demo`: offline generation with a dummy-weight OPT on whatever devices exist."""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mode", default="disaggregated")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    # On a CPU-only machine, two virtual devices hold the prefill and the decode instance.
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=2").strip()
    from dsjax import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", dtype=args.dtype, mode=args.mode)
    prompts = ["The capital of France is", "DistServe separates prefill and decode because",
               "A paged KV cache"]
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95,
                                                max_tokens=args.max_tokens, ignore_eos=True))
    elapsed = time.perf_counter() - start
    for out in outs:
        print(f"{out.prompt!r} -> {len(out.token_ids)} tokens: {out.text!r}")
    print(f"{sum(len(o.token_ids) for o in outs)} tokens in {elapsed:.1f} s (first call compiles)")
    llm.shutdown()


if __name__ == "__main__":
    main()
