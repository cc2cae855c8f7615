"""Dynamic prefill:decode rebalancing, a simulated policy (DistServe issue #28 asked for it).

Every window the policy measures each role's load as a share of its capacity:
- prefill: stage-0 busy time in the window plus the queued prompts' work, over the window times
  the prefill instances;
- decode: requests held (running, waiting, swapped) plus those waiting to be pulled, over the
  instances times the batch one instance can step within the TPOT SLO at the current mean context.
If moving one instance from the lighter role to the busier one lowers the higher of the two loads
by the factor `gain` in `patience` windows in a row (a start-up or a burst passes), it drains that
instance (a prefill instance finishes its batches and waits
for decode to pull their KV; a decode instance hands its requests to the other decode instances,
which pull their KV over the link) and the instance rejoins in the other role. One switch at a
time; each role keeps at least one instance. Both roles must share one parallelism.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dsjax.eval.simulator.sim_instances import MS, DecodeInstance

if TYPE_CHECKING:
    from dsjax.eval.simulator.cluster import Cluster


@dataclasses.dataclass(frozen=True)
class RebalancePolicy:
    tpot_slo: float            # seconds: sets a decode instance's capacity
    window_s: float = 5.0      # how often the loads are measured
    gain: float = 1.2          # required drop of the higher load; hysteresis against flapping
    patience: int = 2          # windows in a row that must call for the same move

    def __post_init__(self):
        if self.tpot_slo <= 0 or self.window_s <= 0 or self.gain < 1 or self.patience < 1:
            raise ValueError(f"rebalance policy needs tpot_slo > 0, window_s > 0, gain >= 1, "
                             f"patience >= 1: {self}")


class Rebalancer:
    def __init__(self, cluster: "Cluster", policy: RebalancePolicy):
        self.cluster, self.policy = cluster, policy
        self.busy_seen: dict[int, float] = {}      # id(prefill instance) -> busy_s at the last tick
        self.instances = len(cluster.prefills) + len(cluster.decodes)
        self.calls: list[str] = []                 # the move each recent window called for
        self.loads: list[tuple[float, float, float]] = []   # (time, prefill load, decode load)

    def start(self) -> None:
        self.cluster.loop.at(self.policy.window_s, self.tick)

    def tick(self) -> None:
        cluster = self.cluster
        if len(cluster.finished) >= cluster.num_requests:
            return            # nothing left to serve: stop ticking so the run can end
        prefill, decode = self.prefill_load(), self.decode_load()
        self.loads.append((cluster.loop.now, prefill, decode))
        if len(cluster.prefills) + len(cluster.decodes) == self.instances:   # no drain under way
            self.calls = (self.calls + [self.move(prefill, decode)])[-self.policy.patience:]
            call = self.calls[0]
            if call and len(self.calls) == self.policy.patience and self.calls.count(call) == len(self.calls):
                self.calls = []
                self.switch(call)
        else:
            self.calls = []
        cluster.loop.at(cluster.loop.now + self.policy.window_s, self.tick)

    def move(self, prefill: float, decode: float) -> str:
        """"to_prefill", "to_decode" or "" (stay), by these loads."""
        cluster = self.cluster
        n_p, n_d = len(cluster.prefills), len(cluster.decodes)
        moves = []
        if n_d > 1:
            moves.append((max(prefill * n_p / (n_p + 1), decode * n_d / (n_d - 1)), "to_prefill"))
        if n_p > 1:
            moves.append((max(prefill * n_p / (n_p - 1), decode * n_d / (n_d + 1)), "to_decode"))
        if not moves:
            return ""
        new_max, move = min(moves)
        return move if new_max * self.policy.gain < max(prefill, decode) else ""

    def switch(self, move: str) -> None:
        cluster = self.cluster
        if move == "to_prefill":   # the decode instance with the least KV to hand over
            cluster.switch_role(min(cluster.decodes, key=lambda d: d.used))
        else:
            cluster.switch_role(min(cluster.prefills, key=lambda p: p.used + p.queued_tokens))

    def prefill_load(self) -> float:
        cluster, window = self.cluster, self.policy.window_s
        busy, backlog = 0.0, 0.0
        for inst in cluster.prefills:
            busy += inst.busy_s - self.busy_seen.get(id(inst), 0.0)
            self.busy_seen[id(inst)] = inst.busy_s
            # Queued prompts' work at the per-token rate (their batches' fixed costs ignored).
            backlog += inst.queued_tokens * cluster.model.coeffs(inst.spec.tp).prefill[1] / inst.spec.pp * MS
        return (busy + backlog) / (window * len(cluster.prefills))

    def decode_load(self) -> float:
        cluster = self.cluster
        held = sum(d.resident() for d in cluster.decodes) + len(cluster.pending)
        contexts = [r.context_len for d in cluster.decodes for lane in d.lanes for r in lane.running.values()]
        mean_ctx = sum(contexts) / len(contexts) if contexts else 0.0
        capacity = sum(slo_batch(d, mean_ctx, self.policy.tpot_slo) for d in cluster.decodes)
        return held / capacity


def slo_batch(inst: DecodeInstance, mean_ctx: float, tpot_slo: float) -> int:
    """The largest batch `inst` steps within `tpot_slo` at this mean context (at least 1; its
    KV capacity and max batch bound it too). Decode PP runs pp such batches side by side."""
    model, tp = inst.model, inst.spec.tp
    fits = lambda b: model.decode_stage_ms(b, b * mean_ctx, tp, 1) + model.overhead_ms(b * mean_ctx) \
        <= tpot_slo * 1e3
    lo, hi = 1, inst.lane_max
    if mean_ctx > 0:
        hi = min(hi, max(1, int(inst.capacity / inst.spec.pp // mean_ctx)))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo * inst.spec.pp
