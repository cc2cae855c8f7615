"""`python -m dsjax.eval.simulator`: simulate one (dataset, rate, placement) run and write an .exp file.

  python -m dsjax.eval.simulator --model opt-13b --dataset sharegpt --mode disaggregated \\
      --prefill-tp 2 --decode-tp 1 --rate 4 --num-prompts 300 --exp-out distserve-300-4.exp
"""
from __future__ import annotations

import argparse
import sys
import time

from dsjax.eval.workloads import get_dataset
from dsjax.eval.latency_model import StepOverhead, load_profile_or_scaled
from dsjax.eval.results import format_summary, save_exp, summarize
from dsjax.eval.simulator import SIM_MODES, Parallelism, SimConfig, simulate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsjax.eval.simulator", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--profile", default=None, help="DistServe-format profile JSON (default: A100)")
    p.add_argument("--dataset", default="sharegpt", help="prepared dataset file, or sharegpt / humaneval")
    p.add_argument("--mode", choices=SIM_MODES, default="disaggregated")
    p.add_argument("--rate", type=float, required=True, help="arrival rate, req/s")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps")
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-tp", type=int, default=1, help="also the colocated instance's TP")
    p.add_argument("--prefill-pp", type=int, default=1, help="also the colocated instance's PP")
    p.add_argument("--decode-tp", type=int, default=1)
    p.add_argument("--decode-pp", type=int, default=1)
    p.add_argument("--num-prefill", type=int, default=1, help="also the number of colocated instances")
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--link-gbps", type=float, default=None,
                   help="KV transfer bandwidth in GB/s (default: 25, cross-node)")
    p.add_argument("--chunk-size", type=int, default=512, help="chunked mode's token budget")
    p.add_argument("--overhead-ms", type=StepOverhead.parse, default=None, metavar="BASE,PER_TOKEN",
                   help="host overhead per step in ms, plus ms per context token (default: the "
                        "profile's; DistServe's A100 files have none)")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds, for the printed attainment")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds, for the printed attainment")
    p.add_argument("--exp-out", default=None, help="write the per-request results here (.exp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, note = load_profile_or_scaled(args.profile, args.model)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.overhead_ms is not None:
        model = model.with_overhead(args.overhead_ms)
    dataset = get_dataset(args.dataset)
    reqs = dataset.sample(args.num_prompts, seed=args.seed)
    extra = {} if args.link_gbps is None else {"kv_link_bytes_per_s": args.link_gbps * 1e9}
    config = SimConfig(mode=args.mode, prefill=Parallelism(args.prefill_tp, args.prefill_pp),
                       decode=Parallelism(args.decode_tp, args.decode_pp), num_prefill=args.num_prefill,
                       num_decode=args.num_decode, chunk_size=args.chunk_size, **extra)
    started = time.perf_counter()
    sims = simulate(model, reqs, args.rate, config, seed=args.seed, cv=args.cv)
    results = [s.to_result() for s in sims]
    print(format_summary(summarize(results, args.ttft_slo, args.tpot_slo)))
    print(f"simulated {len(results)} requests in {time.perf_counter() - started:.2f} s")
    if args.exp_out:
        save_exp(results, args.exp_out)
        print(f"wrote {args.exp_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
