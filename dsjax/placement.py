"""`python -m dsjax.placement`: search the goodput-optimal placement and write a server config.

Example (the artifact's OPT-13B case):
  python -m dsjax.placement --model opt-13b --dataset sharegpt --ttft-slo 0.2 --tpot-slo 0.1 \\
      --num-nodes 1 --gpus-per-node 4 --affinity low --output placement.toml
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dsjax.eval.workloads import get_dataset
from dsjax.eval.placement_search import SLO, search_placement
from dsjax.eval.latency_model import load_profile


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
    p.add_argument("--affinity", choices=("high", "low"), default="high")
    p.add_argument("--backend", choices=("distserve", "colocated"), default="distserve")
    p.add_argument("--rate", type=float, default=None,
                   help="traffic to serve (req/s); sizes instance counts as in Algorithm 1. "
                        "Default: fill the cluster with the best unit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the placement as a TOML server config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.attainment <= 1:
        sys.exit(f"--attainment must be in (0, 1], got {args.attainment}")
    model = load_profile(args.profile, args.model)
    dataset = get_dataset(args.dataset)
    reqs = dataset.sample(min(args.num_prompts, len(dataset.reqs)), seed=args.seed)
    started = time.perf_counter()
    placement = search_placement(model, reqs, SLO(args.ttft_slo, args.tpot_slo, args.attainment),
                                 args.num_nodes, args.gpus_per_node, args.affinity, args.backend,
                                 args.rate, args.seed, progress=True)
    elapsed = time.perf_counter() - started
    print(placement.table())
    print(f"searched {args.num_nodes} x {args.gpus_per_node} GPUs ({args.affinity} affinity, "
          f"{args.backend}) in {elapsed:.1f} s; placement serves {placement.goodput:.2f} req/s "
          f"on {placement.num_gpus} GPUs (per-phase estimate {placement.estimate:.2f})")
    if args.output:
        Path(args.output).write_text(placement.to_toml())
        print(f"wrote {args.output}")
    print(placement.best_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
