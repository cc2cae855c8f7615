"""Goodput-optimal placement search (DistServe's Algorithms 1 and 2) over the simulator.

Goodput of a configuration = the highest arrival rate whose simulated SLO attainment reaches the
target, found by bracketing then bisection on the rate. A candidate is first tried at the rate
that would only tie the best per-GPU goodput so far; if it fails there it cannot win and is
dropped after one simulation (the artifact prunes the same way).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from tqdm import tqdm

from dsjax.eval.latency_model import LatencyModel
from dsjax.eval.simulator import (CROSS_NODE_BYTES_PER_S, NVLINK_BYTES_PER_S, Parallelism, SimConfig,
                             SimRequest, StopSimulation, simulate)
from dsjax.eval.simulator.cluster import HasLengths

REL_TOLERANCE = 0.02      # stop bisecting when hi / lo < 1.02
MIN_RATE = 1e-3
MAX_RATE_PER_GPU = 100.0  # bracketing stops here: an SLO loose enough to pass beyond it is unbounded
# A sample simulated at a high rate arrives faster than requests finish, so the whole sample
# can sit in one batch and look fine. Repeat it until arrivals span this long.
MIN_HORIZON_S = 60.0
VERIFY_TOP = 3            # Algorithm 1: units simulated whole before choosing


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft: float            # seconds
    tpot: float            # seconds
    attainment: float = 0.9


@dataclasses.dataclass
class Candidate:
    role: str                          # "prefill", "decode", "pair" or "colocated"
    prefill: Parallelism | None
    decode: Parallelism | None
    num_gpus: int
    goodput: float | None = None       # req/s of one instance (pair); None: pruned, cannot win
    note: str = ""
    nodes: int = 1                     # nodes a low-affinity unit spans (inter-node PP degree)

    @property
    def per_gpu(self) -> float | None:
        return None if self.goodput is None else self.goodput / self.num_gpus


@dataclasses.dataclass
class Placement:
    model: str
    mode: str                          # "disaggregated" or "colocated"
    prefill: Parallelism
    decode: Parallelism
    num_prefill: int
    num_decode: int
    goodput: float                     # req/s of the whole placement, simulated
    candidates: list[Candidate]
    estimate: float = 0.0              # req/s predicted from the per-phase goodputs

    @property
    def num_gpus(self) -> int:
        if self.mode == "colocated":
            return self.num_prefill * self.prefill.num_gpus
        return self.num_prefill * self.prefill.num_gpus + self.num_decode * self.decode.num_gpus

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.num_gpus

    def best_line(self) -> str:
        p, d = self.prefill, self.decode
        return (f"best: prefill tp={p.tp} pp={p.pp} x {self.num_prefill}, decode tp={d.tp} pp={d.pp} "
                f"x {self.num_decode}, goodput {self.per_gpu:.2f} req/s per GPU")

    def to_toml(self) -> str:
        name = self.model.removeprefix("facebook/")
        if self.mode == "colocated":
            # The colocated engine runs one instance with the context parallelism; replicas are
            # separate servers (noted in the comment).
            return (f'# {self.num_prefill} replica(s) of this instance\nmode = "colocated"\n'
                    f'model = "{name}"\ncontext_tensor_parallel_size = {self.prefill.tp}\n'
                    f'context_pipeline_parallel_size = {self.prefill.pp}\n')
        return (f'mode = "disaggregated"\nmodel = "{name}"\n'
                f'context_tensor_parallel_size = {self.prefill.tp}\n'
                f'context_pipeline_parallel_size = {self.prefill.pp}\n'
                f'decoding_tensor_parallel_size = {self.decode.tp}\n'
                f'decoding_pipeline_parallel_size = {self.decode.pp}\n'
                f'num_prefill_instances = {self.num_prefill}\nnum_decode_instances = {self.num_decode}\n')

    def table(self) -> str:
        lines = [f"{'role':<10}{'prefill':>12}{'decode':>12}{'GPUs':>6}{'req/s':>10}{'per GPU':>10}  note"]
        for c in self.candidates:
            spec = lambda s: f"tp{s.tp} pp{s.pp}" if s else "-"
            rate = "-" if c.note else "pruned" if c.goodput is None else f"{c.goodput:.2f}"
            per = "" if c.per_gpu is None else f"{c.per_gpu:.3f}"
            lines.append(f"{c.role:<10}{spec(c.prefill):>12}{spec(c.decode):>12}{c.num_gpus:>6}"
                         f"{rate:>10}{per:>10}  {c.note}")
        return "\n".join(lines)


# ---------------------------------------------------------------- rate search

def max_rate(passes: Callable[[float], bool], start: float, floor: float = 0.0,
             ceiling: float = math.inf) -> float | None:
    """Highest rate with passes(rate), to REL_TOLERANCE, at most `ceiling`. If `floor` > 0 and
    the rate fails there, returns None (cannot beat floor). Returns 0.0 when even MIN_RATE fails."""
    if floor > 0:
        if not passes(floor):
            return None
        lo, hi = floor, None
    elif passes(start):
        lo, hi = start, None
    elif not passes(MIN_RATE):
        return 0.0        # fails even unloaded: two simulations, not a dozen halvings
    else:
        lo, hi = MIN_RATE, start
        rate = start / 2
        while rate > MIN_RATE:
            if passes(rate):
                lo = rate
                break
            hi, rate = rate, rate / 2
    while hi is None:   # bracket upwards
        rate = min(lo * 2, ceiling)
        if rate <= lo:
            return lo
        if passes(rate):
            lo = rate
        else:
            hi = rate
    while hi / lo > 1 + REL_TOLERANCE:
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo


class Searcher:
    """Runs simulations for one model, request sample and SLO."""

    def __init__(self, model: LatencyModel, reqs: Sequence[HasLengths], slo: SLO, seed: int = 0,
                 base: SimConfig = SimConfig()):
        self.model, self.reqs, self.slo, self.seed, self.base = model, list(reqs), slo, seed, base
        self.num_sims = 0
        self.max_context = max(r.prompt_len + r.output_len for r in self.reqs)

    def requests_for(self, rate: float) -> list[HasLengths]:
        num = max(len(self.reqs), math.ceil(rate * MIN_HORIZON_S))
        return [self.reqs[i % len(self.reqs)] for i in range(num)]

    def attains(self, config: SimConfig, rate: float, metric: str) -> bool:
        self.num_sims += 1
        reqs = self.requests_for(rate)
        allowed = math.floor((1 - self.slo.attainment) * len(reqs) + 1e-9)
        misses = 0
        ttft_slo, tpot_slo = self.slo.ttft, self.slo.tpot
        check_ttft, check_tpot = metric in ("both", "ttft"), metric in ("both", "tpot")

        def watch(req: SimRequest) -> None:
            # Overloaded runs are the slow ones; stop once the target is out of reach.
            nonlocal misses
            if (check_ttft and req.ttft() > ttft_slo) or (check_tpot and req.tpot() > tpot_slo):
                misses += 1
                if misses > allowed:
                    raise StopSimulation

        try:
            simulate(self.model, reqs, rate, config, seed=self.seed, watcher=watch)
        except StopSimulation:
            return False
        return True

    def goodput(self, config: SimConfig, metric: str, num_gpus: int, best_per_gpu: float) -> float | None:
        return max_rate(lambda r: self.attains(config, r, metric), start=num_gpus,
                        floor=best_per_gpu * num_gpus, ceiling=MAX_RATE_PER_GPU * num_gpus)

    def fits(self, spec: Parallelism) -> str:
        """'' when an instance of this shape holds the longest request's KV, else the reason."""
        cap = self.model.kv_capacity_tokens(spec.tp, spec.pp)
        if cap < self.max_context:
            return f"KV capacity {cap} tokens < longest request {self.max_context} (weights too big)"
        return ""


def parallel_degrees(model: LatencyModel, max_tp: int, max_pp: int) -> tuple[list[int], list[int]]:
    """TP degrees dividing the attention heads (<= max_tp: TP stays inside a node), PP degrees
    dividing the layers (<= max_pp)."""
    cfg = model.config
    tps = [t for t in range(1, max_tp + 1) if cfg.num_attention_heads % t == 0]
    pps = [p for p in range(1, max_pp + 1) if cfg.num_hidden_layers % p == 0]
    return tps, pps


# ---------------------------------------------------------------- Algorithm 1: high affinity

def _phase_goodputs(searcher: Searcher, role: str, specs: list[Parallelism], bar) -> list[Candidate]:
    """Every shape's goodput for one phase alone. No pruning: the best pair must also fit the
    cluster together, so a shape that loses per GPU may still be the one used."""
    mode, metric = ("prefill_only", "ttft") if role == "prefill" else ("decode_only", "tpot")
    out = []
    for spec in specs:
        cand = Candidate(role, spec if role == "prefill" else None, spec if role == "decode" else None,
                         spec.num_gpus)
        cand.note = searcher.fits(spec)
        if not cand.note:
            config = dataclasses.replace(searcher.base, mode=mode, prefill=spec, decode=spec,
                                         num_prefill=1, num_decode=1)
            cand.goodput = searcher.goodput(config, metric, spec.num_gpus, 0.0)
        out.append(cand)
        bar.update(1)
    return out


def _best_of(cands: list[Candidate]) -> Candidate | None:
    ok = [c for c in cands if c.goodput]
    # Highest per-GPU goodput; ties go to fewer GPUs (finer replication).
    return max(ok, key=lambda c: (round(c.per_gpu, 9), -c.num_gpus), default=None)


def _pick_pairs(prefills: list[Candidate], decodes: list[Candidate], total_gpus: int,
                rate: float | None, keep: int) -> list[tuple[Candidate, Candidate, int, int]]:
    """Algorithm 1's replication. With a rate: the best per-GPU shape of each phase, n = ceil(R /
    prefill goodput), m = ceil(R / decode goodput). Without: the `keep` best (shapes, smallest
    (n, m)) by min(n*Gp, m*Gd) per GPU among those that fit the cluster together."""
    prefills = [c for c in prefills if c.goodput]
    decodes = [c for c in decodes if c.goodput]
    if not prefills or not decodes:
        raise ValueError("no prefill or decode configuration meets the SLO at any rate; "
                         "loosen the SLOs or give the model more GPUs")
    if rate is not None:
        bp, bd = _best_of(prefills), _best_of(decodes)
        n, m = math.ceil(rate / bp.goodput), math.ceil(rate / bd.goodput)
        if n * bp.num_gpus + m * bd.num_gpus > total_gpus:
            raise ValueError(f"serving {rate} req/s needs {n} prefill x {bp.num_gpus} + {m} decode x "
                             f"{bd.num_gpus} GPUs, more than the cluster's {total_gpus}; lower --rate "
                             f"or add nodes")
        return [(bp, bd, n, m)]
    scored = []
    for p in prefills:
        for d in decodes:
            best, choice = 0.0, None
            for n in range(1, total_gpus // p.num_gpus + 1):
                for m in range(1, (total_gpus - n * p.num_gpus) // d.num_gpus + 1):
                    per_gpu = min(n * p.goodput, m * d.goodput) / (n * p.num_gpus + m * d.num_gpus)
                    if per_gpu > best * (1 + 1e-9):
                        best, choice = per_gpu, (p, d, n, m)
            if choice:
                scored.append((best, choice))
    if not scored:
        raise ValueError(f"no prefill + decode pair fits in {total_gpus} GPUs; add GPUs")
    scored.sort(key=lambda x: -x[0])
    return [choice for _, choice in scored[:keep]]


def search_high_affinity(searcher: Searcher, num_nodes: int, gpus_per_node: int,
                         rate: float | None = None, progress: bool = True) -> Placement:
    total = num_nodes * gpus_per_node
    tps, pps = parallel_degrees(searcher.model, gpus_per_node, total)
    specs = [Parallelism(t, p) for t in tps for p in pps if t * p <= total]
    with tqdm(total=2 * len(specs), desc="placement (high affinity)", disable=not progress) as bar:
        prefills = _phase_goodputs(searcher, "prefill", specs, bar)
        decodes = _phase_goodputs(searcher, "decode", specs, bar)
    # Per-phase goodputs count each SLO alone and ignore migration; attaining both at once is
    # harder, so simulate the few best units whole and keep the best of those.
    best = None
    for bp, bd, n, m in _pick_pairs(prefills, decodes, total, rate, keep=VERIFY_TOP):
        config = dataclasses.replace(searcher.base, mode="disaggregated", prefill=bp.prefill,
                                     decode=bd.decode, num_prefill=n, num_decode=m,
                                     kv_link_bytes_per_s=CROSS_NODE_BYTES_PER_S)
        gpus = n * bp.num_gpus + m * bd.num_gpus
        goodput = max_rate(lambda r: searcher.attains(config, r, "both"), start=gpus,
                           ceiling=MAX_RATE_PER_GPU * gpus) or 0.0
        if best is None or goodput / gpus > best[0] / best[1]:
            best = (goodput, gpus, bp, bd, n, m)
    goodput, gpus, bp, bd, n, m = best
    cands = prefills + decodes
    copies = 1 if rate is not None else total // gpus
    return Placement(searcher.model.model, "disaggregated", bp.prefill, bd.decode, n * copies,
                     m * copies, goodput * copies, cands,
                     estimate=copies * min(n * bp.goodput, m * bd.goodput))


# ---------------------------------------------------------------- Algorithm 2: low affinity

def search_low_affinity(searcher: Searcher, num_nodes: int, gpus_per_node: int,
                        rate: float | None = None, progress: bool = True) -> Placement:
    """Each unit: prefill and decode stages holding the same layers share a node (KV over NVLink);
    pp_cross nodes hold the pipeline. Enumerate pp_cross, then the intra-node split."""
    tps, pps = parallel_degrees(searcher.model, gpus_per_node, gpus_per_node)
    _, all_pps = parallel_degrees(searcher.model, gpus_per_node, num_nodes * gpus_per_node)
    units = []
    for cross in (p for p in all_pps if p <= num_nodes):
        for tp_p in tps:
            for pp_p in pps:
                for tp_d in tps:
                    for pp_d in pps:
                        if tp_p * pp_p + tp_d * pp_d <= gpus_per_node and \
                                pp_p * cross in all_pps and pp_d * cross in all_pps:
                            units.append((cross, Parallelism(tp_p, pp_p * cross), Parallelism(tp_d, pp_d * cross)))
    best, cands = 0.0, []
    for cross, pspec, dspec in tqdm(units, desc="placement (low affinity)", disable=not progress):
        cand = Candidate("pair", pspec, dspec, pspec.num_gpus + dspec.num_gpus,
                         note=searcher.fits(pspec) or searcher.fits(dspec), nodes=cross)
        if not cand.note:
            config = dataclasses.replace(searcher.base, mode="disaggregated", prefill=pspec,
                                         decode=dspec, num_prefill=1, num_decode=1,
                                         kv_link_bytes_per_s=NVLINK_BYTES_PER_S)
            cand.goodput = searcher.goodput(config, "both", cand.num_gpus, best)
            if cand.goodput is not None:
                best = max(best, cand.per_gpu)
        cands.append(cand)
    top = _best_of(cands)
    if top is None:
        raise ValueError("no placement meets the SLO at any rate; loosen the SLOs or add GPUs")
    copies = _unit_copies(top, num_nodes, gpus_per_node, rate)
    return Placement(searcher.model.model, "disaggregated", top.prefill, top.decode, copies, copies,
                     copies * top.goodput, cands, estimate=copies * top.goodput)


def _unit_copies(unit: Candidate, num_nodes: int, gpus_per_node: int, rate: float | None) -> int:
    fit = (num_nodes // unit.nodes) * (gpus_per_node // (unit.num_gpus // unit.nodes))
    if rate is None:
        return fit
    need = math.ceil(rate / unit.goodput)
    if need > fit:
        raise ValueError(f"serving {rate} req/s needs {need} units of {unit.num_gpus} GPUs; the "
                         f"cluster holds {fit}. Lower --rate or add nodes")
    return need


# ---------------------------------------------------------------- colocated baseline

def search_colocated(searcher: Searcher, num_nodes: int, gpus_per_node: int,
                     rate: float | None = None, progress: bool = True) -> Placement:
    """vLLM-style: one engine per instance; the best (TP, PP) per GPU, replicated."""
    total = num_nodes * gpus_per_node
    tps, pps = parallel_degrees(searcher.model, gpus_per_node, total)
    specs = [Parallelism(t, p) for t in tps for p in pps if t * p <= total]
    best, cands = 0.0, []
    for spec in tqdm(specs, desc="placement (colocated)", disable=not progress):
        cand = Candidate("colocated", spec, spec, spec.num_gpus, note=searcher.fits(spec))
        if not cand.note:
            config = dataclasses.replace(searcher.base, mode="colocated", prefill=spec, num_prefill=1)
            cand.goodput = searcher.goodput(config, "both", spec.num_gpus, best)
            if cand.goodput is not None:
                best = max(best, cand.per_gpu)
        cands.append(cand)
    top = _best_of(cands)
    if top is None:
        raise ValueError("no colocated configuration meets the SLO at any rate")
    copies = total // top.num_gpus if rate is None else math.ceil(rate / top.goodput)
    return Placement(searcher.model.model, "colocated", top.prefill, top.prefill, copies, copies,
                     copies * top.goodput, cands, estimate=copies * top.goodput)


def search_placement(model: LatencyModel, reqs: Sequence[HasLengths], slo: SLO, num_nodes: int = 1,
                     gpus_per_node: int = 8, affinity: str = "high", backend: str = "distserve",
                     rate: float | None = None, seed: int = 0, progress: bool = True,
                     base: SimConfig = SimConfig()) -> Placement:
    searcher = Searcher(model, reqs, slo, seed, base)
    if backend == "colocated":
        return search_colocated(searcher, num_nodes, gpus_per_node, rate, progress)
    if backend != "distserve":
        raise ValueError(f"unknown backend {backend!r}; choose distserve or colocated")
    if affinity == "high":
        return search_high_affinity(searcher, num_nodes, gpus_per_node, rate, progress)
    if affinity == "low":
        return search_low_affinity(searcher, num_nodes, gpus_per_node, rate, progress)
    raise ValueError(f"unknown affinity {affinity!r}; choose high or low")
