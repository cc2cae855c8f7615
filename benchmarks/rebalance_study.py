"""Dynamic prefill:decode rebalancing against static placements (DistServe issue #28).

OPT-13B on one node of 8 GPUs, DistServe's A100 profile, SLO 2 s TTFT / 0.1 s TPOT. The trace's
first half is prefill-heavy (LongBench-like: ~1740 tokens in, ~90 out), its second half
decode-heavy (64-256 in, 300-700 out), in that order, so the mix shifts halfway through.
Compared, by goodput on the whole trace:
- the placement search's best disaggregated placement for the whole trace (any shapes);
- every static split of 8 TP1 instances into prefill and decode, and the best one;
- the rebalancing policy (dsjax.eval.simulator.rebalance) on 8 TP1 instances, starting from the
  best static split and from the split best for the first half alone;
- for reference, the best static split of each half served alone.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from dsjax.eval.latency_model import load_profile  # noqa: E402
from dsjax.eval.placement_search import SLO, Searcher, search  # noqa: E402
from dsjax.eval.simulator import Cluster, Parallelism, RebalancePolicy, poisson_arrivals  # noqa: E402
from dsjax.eval.units import Unit  # noqa: E402
from paper_workloads import longbench_like, uniform_lengths  # noqa: E402

TTFT, TPOT = 2.0, 0.1
GPUS = 8
TP1 = Parallelism(1, 1)


def split(num_prefill: int) -> Unit:
    return Unit("disaggregated", TP1, TP1, num_prefill, GPUS - num_prefill)


def trace(half: int) -> tuple[list, list]:
    return longbench_like(half, seed=1), uniform_lengths(half, (64, 256), (300, 700), seed=2)


def best_split(searcher: Searcher) -> tuple[int, float]:
    """(prefill instances, goodput) of the best static split for this searcher's requests."""
    goodputs = {k: searcher.unit_goodput(split(k)) or 0.0 for k in range(1, GPUS)}
    k = max(goodputs, key=goodputs.get)
    return k, goodputs[k]


def dynamic(searcher: Searcher, start: int) -> tuple[float, int]:
    """Goodput of the rebalancing policy from `start` prefill instances, and the role switches
    it makes at that rate."""
    config = dataclasses.replace(split(start).sim_config(searcher.base),
                                 rebalance=RebalancePolicy(tpot_slo=TPOT))
    goodput = searcher.goodput(config, "both", GPUS, 0.0) or 0.0
    reqs = searcher.requests_for(goodput)
    cluster = Cluster(searcher.model, config)
    cluster.run(reqs, poisson_arrivals(len(reqs), goodput, searcher.seed))
    return goodput, len(cluster.role_switches)


def rebalance_table(quick: bool = False) -> str:
    model, slo = load_profile(None, "opt-13b"), SLO(TTFT, TPOT)
    first, second = trace(150 if quick else 1000)
    whole = Searcher(model, first + second, slo)
    found = search(model, first + second, slo, ["disaggregated"], 1, GPUS, progress=False)
    searched = found.placements["disaggregated"]
    static_k, static = best_split(whole)
    first_k, first_alone = best_split(Searcher(model, first, slo))
    second_k, second_alone = best_split(Searcher(model, second, slo))
    rows = [("search's best disaggregated, whole trace", searched.describe(), searched.goodput, "-")]
    rows += [(f"static split {k}P:{GPUS - k}D", split(k).describe(), whole.unit_goodput(split(k)) or 0.0, "-")
             for k in sorted({static_k, first_k, second_k})]
    starts = {static_k: "rebalancing from the best static split"}
    starts.setdefault(first_k, "rebalancing from the first half's best split")
    for k, label in starts.items():
        g, switches = dynamic(whole, k)
        rows.append((label, f"starts {k}P:{GPUS - k}D", g, str(switches)))
    lines = [f"OPT-13B, 1 x {GPUS} A100 (DistServe's profile), SLO {TTFT:g} s / {TPOT:g} s; "
             f"{len(first)} LongBench-like requests then {len(second)} with 64-256 in / 300-700 out. "
             f"Best static split for the first half alone: {first_k}P:{GPUS - first_k}D "
             f"({first_alone / GPUS:.3f} req/s per GPU); second half alone: {second_k}P:{GPUS - second_k}D "
             f"({second_alone / GPUS:.3f}).", "",
             "| placement | instances | goodput (req/s) | per GPU | role switches at that rate |",
             "|---|---|---|---|---|"]
    for label, inst, g, switches in rows:
        gpus = searched.num_gpus if label.startswith("search") else GPUS
        lines.append(f"| {label} | {inst} | {g:.2f} | {g / gpus:.3f} | {switches} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(rebalance_table(quick="--quick" in sys.argv))
