"""`python -m dsjax.placement`: search the goodput-optimal placement over serving modes and
write a server config for the winner.

Example (the artifact's OPT-13B case):
  python -m dsjax.placement --model opt-13b --dataset sharegpt --ttft-slo 0.2 --tpot-slo 0.1 \\
      --num-nodes 1 --gpus-per-node 4 --output placement.toml

Modes: disaggregated (prefill and decode instances), colocated (one engine per instance, any
TP x PP), chunked (chunked prefill, the token budget searched), mixed (copies of several kinds
of unit filling the cluster). The table ranks each mode's best; the last line names the winner.
Profiles carry no host overhead per step unless they say so; --overhead-ms sets one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dsjax.eval.latency_model import StepOverhead, load_profile_or_scaled
from dsjax.eval.placement_search import MODES, SLO, search
from dsjax.eval.workloads import get_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsjax.placement", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-13b", help="OPT size, e.g. opt-13b or facebook/opt-66b")
    p.add_argument("--profile", default=None, help="DistServe-format profile JSON (default: A100)")
    p.add_argument("--dataset", default="sharegpt", help="prepared dataset file, or sharegpt / humaneval")
    p.add_argument("--num-prompts", type=int, default=300, help="requests per simulation (sampled)")
    p.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    p.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9, help="SLO attainment target (0-1)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    p.add_argument("--affinity", choices=("high", "low"), default="high",
                   help="disaggregated search: Algorithm 1 (high) or 2 (low node affinity)")
    p.add_argument("--overhead-ms", type=StepOverhead.parse, default=None, metavar="BASE,PER_TOKEN",
                   help="host overhead per step in ms, plus ms per context token (default: the "
                        "profile's, none for DistServe's A100 files); DistServe's simulator uses 2,0.0001")
    p.add_argument("--cv", type=float, default=1.0, help="burstiness: gamma arrivals' coefficient of variation")
    p.add_argument("--rate", type=float, default=None,
                   help="traffic to serve (req/s): size instance counts for it (Algorithm 1) and rank "
                        "by fewest GPUs. Default: fill the cluster, rank by goodput per GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="processes: modes are searched in parallel (default: one per core)")
    p.add_argument("--verbose", action="store_true", help="also print every simulated candidate")
    p.add_argument("--output", default=None,
                   help="write the winner as a TOML server config (a mixed fleet: one file per part, "
                        "NAME.toml, NAME.2.toml, ...)")
    return p.parse_args(argv)


def output_paths(path: str, parts: int) -> list[Path]:
    first = Path(path)
    return [first] + [first.with_suffix(f".{i}{first.suffix}") for i in range(2, parts + 1)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.attainment <= 1:
        sys.exit(f"--attainment must be in (0, 1], got {args.attainment}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    model, note = load_profile_or_scaled(args.profile, args.model)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.overhead_ms is not None:
        model = model.with_overhead(args.overhead_ms)
    dataset = get_dataset(args.dataset)
    reqs = dataset.sample(min(args.num_prompts, len(dataset.reqs)), seed=args.seed)
    result = search(model, reqs, SLO(args.ttft_slo, args.tpot_slo, args.attainment), modes,
                    args.num_nodes, args.gpus_per_node, args.affinity, args.rate, args.seed, args.cv,
                    jobs=args.jobs)
    if args.verbose:
        print(result.candidates_table())
        print()
    print(result.table())
    over = model.overhead
    print(f"searched {','.join(modes)} on {args.num_nodes} x {args.gpus_per_node} GPUs in "
          f"{result.elapsed_s:.1f} s ({result.cpu_s:.1f} s CPU, {result.num_sims} simulations; host overhead "
          f"{over.base_ms:g} ms + {over.per_token_ms:g} ms/token per step)")
    best = result.best
    if args.output:
        for path, text in zip(output_paths(args.output, len(best.parts)),
                              best.to_toml(args.gpus_per_node)):
            path.write_text(text)
            print(f"wrote {path}")
    print(best.best_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
