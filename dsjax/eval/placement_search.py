"""Goodput-optimal placement search over serving modes, on the simulator.

Modes: "disaggregated" (DistServe's Algorithms 1 and 2), "colocated" (one engine per instance,
vLLM's scheduling, every TP x PP shape), "chunked" (Sarathi's chunked prefill, every shape and
token budget in CHUNK_BUDGETS) and "mixed" (a fleet of units of those modes; see fleet.py).

Goodput of a unit = the highest arrival rate whose simulated SLO attainment reaches the target,
found by bracketing then bisection on the rate. A candidate is first tried at the rate that
would only tie the best per-GPU goodput so far in its mode; if it fails there it cannot win and
is dropped after one simulation (the artifact prunes the same way). Modes are compared per GPU
used, as the paper does; the unit is copied to fill the cluster.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence

from tqdm import tqdm

from dsjax.eval.fleet import Part, best_fleet
from dsjax.eval.latency_model import LatencyModel
from dsjax.eval.simulator import Parallelism, SimConfig, SimRequest, StopSimulation, simulate
from dsjax.eval.simulator.cluster import HasLengths
from dsjax.eval.units import Unit

MODES = ("disaggregated", "colocated", "chunked", "mixed")
# Tokens per chunked iteration (decodes + prompt chunks), largest first: large budgets usually
# win on throughput, and the best found early prunes the rest in one simulation each.
CHUNK_BUDGETS = (4096, 2048, 1024, 512, 256)
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
    """One simulated shape: a phase alone (role "prefill" / "decode") or a whole unit."""
    role: str                          # "prefill", "decode", or a unit's mode
    unit: Unit | None                  # None for a phase alone
    spec: Parallelism | None = None    # a phase alone: its shape
    goodput: float | None = None       # req/s of one unit or instance; None: pruned, cannot win
    note: str = ""                     # why it was not simulated

    @property
    def num_gpus(self) -> int:
        return self.unit.num_gpus if self.unit else self.spec.num_gpus

    @property
    def per_gpu(self) -> float | None:
        return None if self.goodput is None else self.goodput / self.num_gpus

    def describe(self) -> str:
        return self.unit.describe() if self.unit else f"{self.role} tp={self.spec.tp} pp={self.spec.pp}"


@dataclasses.dataclass
class Placement:
    """A mode's answer: copies of one unit (or, for "mixed", of several) and their goodput."""
    model: str
    mode: str
    parts: list[Part]
    candidates: list[Candidate]
    base: SimConfig = SimConfig()      # the batch limits the simulations assumed

    @property
    def goodput(self) -> float:
        return sum(p.copies * p.goodput for p in self.parts)

    @property
    def num_gpus(self) -> int:
        return sum(p.copies * p.unit.num_gpus for p in self.parts)

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.num_gpus

    def describe(self) -> str:
        if self.mode != "mixed":
            return self.parts[0].unit.describe(self.parts[0].copies)
        return " + ".join(f"{p.unit.mode} {p.unit.describe(p.copies)}" for p in self.parts)

    def best_line(self) -> str:
        return f"best: mode={self.mode} {self.describe()}, goodput {self.per_gpu:.2f} req/s per GPU"

    def to_toml(self, gpus_per_node: int | None = None) -> list[str]:
        """One server config per part (a mixed fleet runs several kinds of server behind a
        load balancer that splits traffic in proportion to their goodputs); a server that
        spans nodes of gpus_per_node GPUs gets node assignments for the "ray" backend."""
        name = self.model.removeprefix("facebook/")
        total = self.goodput
        out = []
        for i, p in enumerate(self.parts):
            head = f"# {self.best_line()}\n"
            if len(self.parts) > 1:
                head += (f"# part {i + 1} of {len(self.parts)} of a mixed fleet: give it "
                         f"{p.copies * p.goodput / total:.0%} of the traffic\n")
            out.append(head + p.unit.to_toml(name, p.copies, self.base, gpus_per_node))
        return out


@dataclasses.dataclass
class SearchResult:
    placements: dict[str, Placement]   # mode -> its best placement
    elapsed_s: float                   # wall clock
    cpu_s: float                       # CPU time of the searches (other jobs on the cores excluded)
    num_sims: int
    rate: float | None = None          # the target rate, if the search sized for one
    failures: list[str] = dataclasses.field(default_factory=list)   # modes with no placement, why

    def rank_key(self, p: Placement) -> tuple:
        """Higher is better: goodput per GPU used (the paper's measure), or with a target rate
        the fewest GPUs. Ties go to the simpler mode (MODES order)."""
        if self.rate is None:
            return (round(p.per_gpu, 9), -MODES.index(p.mode))
        return (-p.num_gpus, round(p.goodput, 9), -MODES.index(p.mode))

    @property
    def best(self) -> Placement:
        return max(self.placements.values(), key=self.rank_key)

    def table(self) -> str:
        ranked = sorted(self.placements.values(), key=self.rank_key, reverse=True)
        lines = [f"{'rank':<5}{'mode':<15}{'GPUs':>5}{'req/s':>9}{'per GPU':>9}  placement"]
        for i, p in enumerate(ranked, 1):
            lines.append(f"{i:<5}{p.mode:<15}{p.num_gpus:>5}{p.goodput:>9.2f}{p.per_gpu:>9.3f}  "
                         f"{p.describe()}")
        lines += [f"{'-':<5}{f.split(':')[0]:<15}{'-':>5}{'-':>9}{'-':>9}  {f.split(': ', 1)[1]}"
                  for f in self.failures]
        return "\n".join(lines)

    def candidates_table(self) -> str:
        lines = [f"{'mode':<15}{'GPUs':>5}{'req/s':>9}{'per GPU':>9}  candidate"]
        for mode, p in self.placements.items():
            for c in p.candidates:
                rate = c.note or ("pruned" if c.goodput is None else f"{c.goodput:.2f}")
                per = "" if c.per_gpu is None else f"{c.per_gpu:.3f}"
                lines.append(f"{mode:<15}{c.num_gpus:>5}{rate:>9}{per:>9}  {c.describe()}")
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
    """Runs simulations for one model, request sample, SLO and arrival burstiness (cv)."""

    def __init__(self, model: LatencyModel, reqs: Sequence[HasLengths], slo: SLO, seed: int = 0,
                 base: SimConfig = SimConfig(), cv: float = 1.0):
        self.model, self.reqs, self.slo, self.seed, self.base, self.cv = \
            model, list(reqs), slo, seed, base, cv
        self.num_sims = 0
        self.max_context = max(r.prompt_len + r.output_len for r in self.reqs)

    def requests_for(self, rate: float) -> list[HasLengths]:
        num = max(len(self.reqs), math.ceil(rate * MIN_HORIZON_S))
        return [self.reqs[i % len(self.reqs)] for i in range(num)]

    def attains(self, config: SimConfig, rate: float, metric: str) -> bool:
        self.num_sims += 1
        reqs = self.requests_for(rate)
        allowed = math.floor((1 - self.slo.attainment) * len(reqs) + 1e-9)
        missed: set[int] = set()
        ttft_slo, tpot_slo = self.slo.ttft, self.slo.tpot
        check_ttft, check_tpot = metric in ("both", "ttft"), metric in ("both", "tpot")

        # Overloaded runs are the slow ones; stop once the target is out of reach. A TTFT miss
        # is known at the first token, long before the request finishes.
        def miss(req: SimRequest) -> None:
            missed.add(req.rid)
            if len(missed) > allowed:
                raise StopSimulation

        def first_token(req: SimRequest) -> None:
            if check_ttft and req.ttft() > ttft_slo:
                miss(req)

        def finished(req: SimRequest) -> None:
            if (check_ttft and req.ttft() > ttft_slo) or (check_tpot and req.tpot() > tpot_slo):
                miss(req)

        try:
            simulate(self.model, reqs, rate, config, seed=self.seed, cv=self.cv, watcher=finished,
                     first_token_watcher=first_token)
        except StopSimulation:
            return False
        return True

    def goodput(self, config: SimConfig, metric: str, num_gpus: int, best_per_gpu: float) -> float | None:
        return max_rate(lambda r: self.attains(config, r, metric), start=num_gpus,
                        floor=best_per_gpu * num_gpus, ceiling=MAX_RATE_PER_GPU * num_gpus)

    def unit_goodput(self, unit: Unit, best_per_gpu: float = 0.0) -> float | None:
        return self.goodput(unit.sim_config(self.base), "both", unit.num_gpus, best_per_gpu)

    def fits(self, spec: Parallelism) -> str:
        """'' when an instance of this shape holds the longest request's KV, else the reason."""
        cap = self.model.kv_capacity_tokens(spec.tp, spec.pp)
        if cap < self.max_context:
            return f"KV capacity {cap} tokens < longest request {self.max_context} (weights too big)"
        return ""


def parallel_degrees(model: LatencyModel, max_tp: int, max_pp: int) -> tuple[list[int], list[int]]:
    """TP degrees the model's heads and KV heads allow (<= max_tp: TP stays inside a node), PP
    degrees dividing the layers (<= max_pp)."""
    cfg = model.config
    tps = [t for t in range(1, max_tp + 1) if cfg.tensor_parallel_ok(t)]
    pps = [p for p in range(1, max_pp + 1) if cfg.num_hidden_layers % p == 0]
    return tps, pps


def instance_shapes(model: LatencyModel, num_nodes: int, gpus_per_node: int) -> list[Parallelism]:
    """Every (TP, PP) that fits the cluster, fewest GPUs first (cheap simulations raise the
    pruning floor before the expensive ones run)."""
    total = num_nodes * gpus_per_node
    tps, pps = parallel_degrees(model, gpus_per_node, total)
    return sorted((Parallelism(t, p) for t in tps for p in pps if t * p <= total),
                  key=lambda s: (s.num_gpus, s.pp))


def _best_of(cands: list[Candidate]) -> Candidate | None:
    ok = [c for c in cands if c.goodput]
    # Highest per-GPU goodput; ties go to fewer GPUs (finer replication).
    return max(ok, key=lambda c: (round(c.per_gpu, 9), -c.num_gpus), default=None)


def _copies(unit: Unit, goodput: float, num_nodes: int, gpus_per_node: int, rate: float | None) -> int:
    """Copies of a unit: as many as the cluster holds, or with a rate as many as it needs."""
    fit = (num_nodes // unit.nodes) * (gpus_per_node // (unit.num_gpus // unit.nodes)) \
        if unit.nodes > 1 else num_nodes * gpus_per_node // unit.num_gpus
    if rate is None:
        return fit
    need = math.ceil(rate / goodput)
    if need > fit:
        raise ValueError(f"serving {rate} req/s needs {need} copies of {unit.describe()} "
                         f"({unit.num_gpus} GPUs each); the cluster holds {fit}. Lower --rate or add nodes")
    return need


# ---------------------------------------------------------------- Algorithm 1: high affinity

def _phase_goodputs(searcher: Searcher, role: str, specs: list[Parallelism], bar,
                    floor: Callable[[list[Candidate]], float] = lambda done: 0.0) -> list[Candidate]:
    """Each shape's goodput for one phase alone; `floor(done so far)` is the per-GPU goodput a
    shape must reach to matter (0: simulate it whole)."""
    mode, metric = ("prefill_only", "ttft") if role == "prefill" else ("decode_only", "tpot")
    out: list[Candidate] = []
    for spec in specs:
        cand = Candidate(role, None, spec, note=searcher.fits(spec))
        if not cand.note:
            config = dataclasses.replace(searcher.base, mode=mode, prefill=spec, decode=spec,
                                         num_prefill=1, num_decode=1)
            cand.goodput = searcher.goodput(config, metric, spec.num_gpus, floor(out))
        out.append(cand)
        bar.update(1)
    return out


def _pick_pairs(prefills: list[Candidate], decodes: list[Candidate], total_gpus: int,
                rate: float | None, keep: int) -> list[tuple[float, Unit]]:
    """Algorithm 1's replication, as (estimated per-GPU goodput, unit). With a rate: the best per-GPU shape of each phase, n = ceil(R / prefill goodput),
    m = ceil(R / decode goodput). Without: the `keep` best (shapes, smallest (n, m)) by
    min(n*Gp, m*Gd) per GPU among those that fit the cluster together."""
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
        unit = Unit("disaggregated", bp.spec, bd.spec, n, m)
        return [(min(n * bp.goodput, m * bd.goodput) / unit.num_gpus, unit)]
    scored = []
    for p in prefills:
        for d in decodes:
            best, choice = 0.0, None
            for n in range(1, total_gpus // p.num_gpus + 1):
                for m in range(1, (total_gpus - n * p.num_gpus) // d.num_gpus + 1):
                    per_gpu = min(n * p.goodput, m * d.goodput) / (n * p.num_gpus + m * d.num_gpus)
                    if per_gpu > best * (1 + 1e-9):
                        best, choice = per_gpu, Unit("disaggregated", p.spec, d.spec, n, m)
            if choice:
                scored.append((best, choice))
    if not scored:
        raise ValueError(f"no prefill + decode pair fits in {total_gpus} GPUs; add GPUs")
    scored.sort(key=lambda x: -x[0])
    return scored[:keep]


def _decode_floor(prefills: list[Candidate], total: int, rate: float | None):
    """The per-GPU decode goodput a decode shape needs to improve the best pair so far. A unit
    of prefill and decode shapes with per-GPU goodputs P and D serves at most P*D/(P+D) per
    GPU (perfectly balanced), so with the best prefill P* and the best pair's estimate E a
    decode shape must beat E*P*/(P* - E). With a rate Algorithm 1 takes the best decode per GPU."""
    best_prefill = max((c.per_gpu for c in prefills if c.goodput), default=0.0)

    def floor(decodes: list[Candidate]) -> float:
        done = [c for c in decodes if c.goodput]
        if not done or not best_prefill:
            return 0.0
        if rate is not None:
            return max(c.per_gpu for c in done)
        estimate = _pick_pairs(prefills, done, total, None, keep=1)[0][0]
        return math.inf if estimate >= best_prefill else estimate * best_prefill / (best_prefill - estimate)
    return floor


def search_high_affinity(searcher: Searcher, num_nodes: int, gpus_per_node: int,
                         rate: float | None = None, progress: bool = True) -> Placement:
    total = num_nodes * gpus_per_node
    specs = instance_shapes(searcher.model, num_nodes, gpus_per_node)
    with tqdm(total=2 * len(specs), desc="disaggregated (high affinity)", disable=not progress) as bar:
        prefills = _phase_goodputs(searcher, "prefill", specs, bar)
        decodes = _phase_goodputs(searcher, "decode", specs, bar, _decode_floor(prefills, total, rate))
    # Per-phase goodputs count each SLO alone and ignore migration; attaining both at once is
    # harder, so simulate the few best units whole and keep the best of those.
    units, best = [], 0.0
    for _, unit in _pick_pairs(prefills, decodes, total, rate, keep=VERIFY_TOP):
        cand = Candidate("disaggregated", unit, goodput=searcher.unit_goodput(unit, best))
        best = max(best, cand.per_gpu or 0.0)
        units.append(cand)
    top = _best_of(units) or units[0]
    top.goodput = top.goodput or 0.0
    copies = 1 if rate is not None else _copies(top.unit, top.goodput, num_nodes, gpus_per_node, None)
    return Placement(searcher.model.model, "disaggregated", [Part(top.unit, copies, top.goodput)],
                     prefills + decodes + units, searcher.base)


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
                            units.append(Unit("disaggregated", Parallelism(tp_p, pp_p * cross),
                                              Parallelism(tp_d, pp_d * cross), 1, 1,
                                              affinity="low", nodes=cross))
    cands = _evaluate(searcher, "disaggregated", units, "disaggregated (low affinity)", progress)
    top = _best_of(cands)
    if top is None:
        raise ValueError("no placement meets the SLO at any rate; loosen the SLOs or add GPUs")
    copies = _copies(top.unit, top.goodput, num_nodes, gpus_per_node, rate)
    return Placement(searcher.model.model, "disaggregated", [Part(top.unit, copies, top.goodput)],
                     cands, searcher.base)


def _evaluate(searcher: Searcher, mode: str, units: list[Unit], desc: str,
              progress: bool) -> list[Candidate]:
    """Each unit that fits its GPUs, simulated for its goodput (skipped early once it cannot
    beat the best per GPU so far)."""
    best, cands = 0.0, []
    for unit in tqdm(units, desc=desc, disable=not progress):
        note = searcher.fits(unit.prefill) or (searcher.fits(unit.decode) if unit.decode else "")
        cand = Candidate(mode, unit, note=note)
        if not cand.note:
            cand.goodput = searcher.unit_goodput(unit, best)
            if cand.goodput is not None:
                best = max(best, cand.per_gpu)
        cands.append(cand)
    return cands


# ---------------------------------------------------------------- colocated and chunked

def search_one_engine(searcher: Searcher, mode: str, num_nodes: int, gpus_per_node: int,
                      rate: float | None = None, progress: bool = True) -> Placement:
    """One engine runs both phases: every (TP, PP) shape (PP pipelines micro-batches; it is
    not pruned), and for "chunked" every token budget of CHUNK_BUDGETS; best per GPU, copied."""
    specs = instance_shapes(searcher.model, num_nodes, gpus_per_node)
    budgets = CHUNK_BUDGETS if mode == "chunked" else (None,)
    units = [Unit(mode, spec, chunk=b) for spec in specs for b in budgets]
    cands = _evaluate(searcher, mode, units, mode, progress)
    top = _best_of(cands)
    if top is None:
        raise ValueError(f"no {mode} configuration meets the SLO at any rate")
    copies = _copies(top.unit, top.goodput, num_nodes, gpus_per_node, rate)
    return Placement(searcher.model.model, mode, [Part(top.unit, copies, top.goodput)], cands,
                     searcher.base)


# ---------------------------------------------------------------- all modes

def _search_mode(mode: str, searcher: Searcher, num_nodes: int, gpus_per_node: int, affinity: str,
                 rate: float | None, progress: bool) -> tuple[Placement | str, int, float]:
    """One mode's best placement (or why there is none), the simulations and CPU seconds it took."""
    cpu, sims = time.process_time(), searcher.num_sims
    try:
        if mode == "disaggregated":
            algo = search_high_affinity if affinity == "high" else search_low_affinity
            found = algo(searcher, num_nodes, gpus_per_node, rate, progress)
        else:
            found = search_one_engine(searcher, mode, num_nodes, gpus_per_node, rate, progress)
    except ValueError as e:
        found = f"{mode}: {e}"
    return found, searcher.num_sims - sims, time.process_time() - cpu


def search(model: LatencyModel, reqs: Sequence[HasLengths], slo: SLO, modes: Sequence[str] = MODES,
           num_nodes: int = 1, gpus_per_node: int = 8, affinity: str = "high",
           rate: float | None = None, seed: int = 0, cv: float = 1.0, progress: bool = True,
           base: SimConfig = SimConfig(), jobs: int = 1) -> SearchResult:
    """The best placement of each requested mode ("mixed" builds on the others' candidates,
    searching them if they were not requested). jobs > 1 searches modes in parallel processes
    (their progress bars off)."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"unknown modes {unknown}; choose from {MODES}")
    if affinity not in ("high", "low"):
        raise ValueError(f"unknown affinity {affinity!r}; choose high or low")
    started = time.perf_counter()
    searcher = Searcher(model, reqs, slo, seed, base, cv)
    needed = [m for m in MODES[:3] if "mixed" in modes or m in modes]
    args = [(m, searcher, num_nodes, gpus_per_node, affinity, rate) for m in needed]
    if jobs > 1 and len(needed) > 1:
        # spawn, not fork: the caller may hold threads (JAX, tqdm) that fork would copy mid-lock.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(needed)), mp_context=ctx) as pool:
            outcomes = list(pool.map(_search_mode, *zip(*args), [False] * len(args)))
    else:
        outcomes = [_search_mode(*a, progress) for a in args]
    found = {m: o[0] for m, o in zip(needed, outcomes) if isinstance(o[0], Placement)}
    errors = [o[0] for o in outcomes if isinstance(o[0], str)]
    if "mixed" in modes and found:
        units = [Part(c.unit, 1, c.goodput) for p in found.values() for c in p.candidates
                 if c.unit is not None and c.goodput and c.unit.nodes == 1]
        parts = best_fleet(units, num_nodes, gpus_per_node, rate)
        if parts:
            found["mixed"] = Placement(model.model, "mixed", parts, [], base)
    placements = {m: found[m] for m in MODES if m in modes and m in found}
    if not placements:
        raise ValueError("; ".join(errors) or "no placement meets the SLO")
    return SearchResult(placements, time.perf_counter() - started, sum(o[2] for o in outcomes),
                        sum(o[1] for o in outcomes), rate, [e for e in errors if e.split(":")[0] in modes])
