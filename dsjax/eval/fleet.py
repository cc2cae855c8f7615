"""Mixed fleets: copies of up to two kinds of unit sharing a cluster, traffic split between
them in proportion to their goodputs.

A random split keeps each part's arrivals Poisson (thinning), so if every part attains the SLO
at its own goodput the fleet does at their sum: a fleet's goodput is the sum of its parts'.
Per GPU a fleet is therefore never better than its best part; it wins on what the cluster serves
in total when the best unit leaves GPUs idle (a 3-GPU unit on 4 GPUs), and with a target rate,
which it may meet with fewer GPUs.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from dsjax.eval.units import Unit


@dataclasses.dataclass(frozen=True)
class Part:
    unit: Unit
    copies: int
    goodput: float        # req/s of one copy


def packs(blocks: Sequence[int], num_nodes: int, gpus_per_node: int) -> bool:
    """Whether GPU groups that must each sit in one node fit the nodes (first fit decreasing:
    exact when every size divides the next, as TP degrees 1, 2, 4, 8 do; else it may refuse
    a packing that exists)."""
    free = [gpus_per_node] * num_nodes
    for size in sorted(blocks, reverse=True):
        node = next((i for i, f in enumerate(free) if f >= size), None)
        if node is None:
            return False
        free[node] -= size
    return True


def best_fleet(units: Sequence[Part], num_nodes: int, gpus_per_node: int,
               rate: float | None = None) -> list[Part]:
    """Without a rate: the fleet serving the most in total (ties: fewer GPUs). With one: the
    fewest GPUs serving `rate` (ties: more goodput). `units` are single copies with their
    goodputs; only the best kind per GPU count is considered. [] if nothing fits."""
    kinds: dict[int, Part] = {}
    for u in units:
        if u.goodput and (u.unit.num_gpus not in kinds or u.goodput > kinds[u.unit.num_gpus].goodput):
            kinds[u.unit.num_gpus] = u
    total = num_nodes * gpus_per_node
    options = sorted(kinds.values(), key=lambda u: u.unit.num_gpus)
    best_key, best = None, []
    for a_idx, a in enumerate(options):
        for b in options[a_idx:]:
            ga, gb = a.unit.num_gpus, b.unit.num_gpus
            for i in range(1, total // ga + 1):
                left = total - i * ga
                if rate is None:
                    js = [left // gb] if b is not a else [0]
                else:
                    need = rate - i * a.goodput
                    js = [0] if need <= 0 else [] if b is a else [-(-need // b.goodput)]
                for j in js:
                    j = int(j)
                    if j * gb > left:
                        continue
                    gpus, served = i * ga + j * gb, i * a.goodput + j * b.goodput
                    key = (served, -gpus) if rate is None else (-gpus, served)
                    if best_key is not None and key <= best_key:
                        continue
                    blocks = a.unit.blocks() * i + b.unit.blocks() * j
                    if packs(blocks, num_nodes, gpus_per_node):
                        best_key = key
                        best = [Part(a.unit, i, a.goodput)] + ([Part(b.unit, j, b.goodput)] if j else [])
    return best
