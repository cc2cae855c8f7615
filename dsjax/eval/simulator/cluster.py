"""Clusters of simulated instances, the arrival process, and `simulate()`.

Modes:
- "disaggregated": n prefill + m decode instances; arrivals go to the prefill instance with the
  fewest queued prompt tokens; decode instances pull prefilled requests FCFS (the one with the most
  free KV takes it) when the prompt fits and their own waiting prompts hold under
  EngineConfig.decoding_waiting_share of their KV; the pull takes the link's latency plus KV
  bytes / link bandwidth, then
  the source frees the KV. With a RebalancePolicy, instances change role as the load shifts.
- "prefill_only" / "decode_only": one phase alone (Algorithm 1 sizes each phase this way);
  decode-only requests arrive already prefilled (first token at arrival, no transfer).
- "colocated" (vLLM) and "chunked" (Sarathi): every instance runs both phases.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from dsjax.config import EngineConfig
from dsjax.eval.arrivals import arrival_offsets
from dsjax.eval.latency_model import LatencyModel
from dsjax.eval.simulator.colocated import ColocatedInstance
from dsjax.eval.simulator.events import EventLoop
from dsjax.eval.simulator.rebalance import RebalancePolicy, Rebalancer
from dsjax.eval.simulator.sim_instances import DecodeInstance, Parallelism, PrefillInstance
from dsjax.eval.simulator.sim_request import SimRequest

SIM_MODES = ("disaggregated", "colocated", "chunked", "prefill_only", "decode_only")
NVLINK_BYTES_PER_S = 300e9     # A100 NVLink, one direction
CROSS_NODE_BYTES_PER_S = 25e9  # 200 Gb/s InfiniBand


class HasLengths(Protocol):
    prompt_len: int
    output_len: int


@dataclasses.dataclass(frozen=True)
class SimConfig:
    mode: str = "disaggregated"
    prefill: Parallelism = Parallelism()
    decode: Parallelism = Parallelism()
    num_prefill: int = 1
    num_decode: int = 1
    # Batch limits: the artifact's settings (its api-server launch for the OPT runs: context
    # 128 sequences / 8192 tokens, decoding 1024 sequences), kept here rather than
    # EngineConfig's, whose defaults size a small real engine. Its decoding limit of 65,536
    # tokens is not modelled (DistServe's simulator caps a step at 50,000 context tokens).
    prefill_max_batch: int = 128
    prefill_max_tokens: int = 8192
    decode_max_batch: int = 1024
    kv_link_bytes_per_s: float = CROSS_NODE_BYTES_PER_S
    # A transfer's fixed cost on top of its bytes: it takes latency + bytes / bandwidth.
    kv_link_latency_s: float = 0.0
    # dsjax's instances handle messages between their steps, so a pull also waits for step
    # ends: the decode instance asks at the end of its current step, the prefill instance
    # exports at the end of the step it is then running (often the next batch's, started the
    # moment the last one ended), and the decode instance starts receiving at the end of its
    # step after that. False: the transfer starts as soon as the decode instance has room, as
    # in DistServe's simulator.
    kv_pull_waits_for_steps: bool = True
    # A transfer cannot finish while its source prefill instance runs a step: it ends
    # `latency + bytes / bandwidth` after the source's running steps are done. So it is on a
    # CPU, where the source's step holds the cores that serve the transfer (docs/validation.md,
    # run 11: on a 2-core VM, a median of 13 ms alone and 500-590 ms beside a prefill step).
    # An accelerator's copies do not need its compute units: False. Needs
    # kv_pull_waits_for_steps, which models the steps around a pull.
    kv_transfer_waits_for_source_step: bool = False
    # A pull's cost beyond its transfer and the step ends it waits for: its messages between
    # the instances (ask, export, offer). Fitted by benchmarks/validate_simulator.py from the
    # engine's own hand-offs, first token to second, against simulated ones (engine_fit.
    # fit_pull_overhead); 0 in DistServe's model.
    kv_pull_overhead_s: float = 0.0
    # Seconds added to a decode step that starts while a pull into its instance is in flight
    # (migration_begin to migration_end), and to one that starts while a prefill instance
    # runs a step. On a CPU the pull's work, and with the instances in one process the
    # prefill's host work, take the cores and the interpreter from the step loop
    # (docs/validation.md, run 14: about 1 ms a step each with opt-tiny); fitted by
    # benchmarks/validate_simulator.py (engine_fit.fit_step_costs). 0 in DistServe's model:
    # an accelerator's copies and another instance's steps leave its compute units alone.
    kv_pull_step_cost_s: float = 0.0
    decode_cost_beside_prefill_s: float = 0.0
    # The pull policy's constant has one home, the engine's config.
    decode_waiting_share: float = EngineConfig.decoding_waiting_share
    # colocated / chunked: `prefill` is the instance's parallelism, `num_prefill` the instances;
    # the limits are the artifact's vLLM flags (--max-num-seqs 1024 --max-num-batched-tokens 16384).
    colocated_max_batch: int = 1024
    colocated_max_tokens: int = 16384
    chunk_size: int = 512        # chunked: tokens per iteration (EngineConfig.decoding_max_tokens_per_batch)
    rebalance: RebalancePolicy | None = None

    def __post_init__(self):
        if self.mode not in SIM_MODES:
            raise ValueError(f"unknown simulator mode {self.mode!r}; choose one of {SIM_MODES}")
        if self.kv_transfer_waits_for_source_step and not self.kv_pull_waits_for_steps:
            raise ValueError("kv_transfer_waits_for_source_step models a wait inside a pull "
                             "whose step waits are modelled: set kv_pull_waits_for_steps too")
        if self.rebalance is not None and (self.mode != "disaggregated" or self.prefill != self.decode):
            raise ValueError("rebalancing moves instances between roles: it needs mode "
                             "disaggregated and the same parallelism for prefill and decode")


def poisson_arrivals(num: int, rate: float, seed: int = 0, cv: float = 1.0) -> np.ndarray:
    """Arrival times (s) of gamma-gap arrivals: shape 1/cv^2, scale cv^2/rate; the first at 0."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate}")
    return arrival_offsets(num, rate, cv, seed)  # the load client's exact draw


class StopSimulation(Exception):
    """Raised by a watcher to end a run early (e.g. the SLO target can no longer be met)."""


class Cluster:
    def __init__(self, model: LatencyModel, config: SimConfig,
                 watcher: Callable[[SimRequest], None] | None = None,
                 first_token_watcher: Callable[[SimRequest], None] | None = None):
        self.loop = EventLoop()
        self.model, self.config, self.watcher = model, config, watcher
        self.first_token_watcher = first_token_watcher
        self.finished: list[SimRequest] = []
        self.num_requests = 0
        self.role_switches: list[tuple[float, str]] = []   # (time, "prefill->decode" or back)
        self.pending: deque[tuple[SimRequest, PrefillInstance | None]] = deque()
        self.kv_bytes_per_token = model.kv_bytes_per_token()
        c, loop = config, self.loop
        self.prefills: list = []
        self.decodes: list[DecodeInstance] = []
        if c.mode in ("disaggregated", "prefill_only"):
            self.prefills = [PrefillInstance(loop, model, c.prefill, self, c.prefill_max_batch,
                                             c.prefill_max_tokens, f"prefill{i}") for i in range(c.num_prefill)]
        if c.mode in ("disaggregated", "decode_only"):
            self.decodes = [self._decode_instance(c.decode, f"decode{i}")
                            for i in range(c.num_decode)]
        if c.mode in ("colocated", "chunked"):
            chunk = c.chunk_size if c.mode == "chunked" else None
            self.prefills = [ColocatedInstance(loop, model, c.prefill, self, c.colocated_max_batch,
                                               c.colocated_max_tokens, chunk, f"colocated{i}")
                             for i in range(c.num_prefill)]
        self.rebalancer = Rebalancer(self, c.rebalance) if c.rebalance else None

    # ------------------------------------------------------------ arrivals

    def arrive(self, req: SimRequest) -> None:
        if self.config.mode == "decode_only":
            req.first_token_time = self.loop.now
            req.generated = 1
            if req.output_len <= 1:
                self.on_finished(req)
                return
            self.pending.append((req, None))
            self.dispatch()
            return
        self.route(req)

    def route(self, req: SimRequest) -> None:
        target = min(self.prefills, key=lambda inst: inst.load())   # ties: the lowest index
        target.submit(req)

    # ------------------------------------------------------------ instance callbacks

    def on_first_token(self, req: SimRequest) -> None:
        if self.first_token_watcher is not None:
            self.first_token_watcher(req)

    def on_prefilled(self, req: SimRequest, inst: PrefillInstance) -> None:
        self.on_first_token(req)
        if req.output_len <= 1 or self.config.mode == "prefill_only":
            inst.release(req)
            self.on_finished(req)
            return
        self.pending.append((req, inst))
        self.dispatch()

    def on_finished(self, req: SimRequest) -> None:
        req.done_time = self.loop.now
        self.finished.append(req)
        if self.watcher is not None:
            self.watcher(req)

    def on_decode_progress(self, inst: DecodeInstance) -> None:
        if self.pending:
            self.dispatch()

    # ------------------------------------------------------------ role changes (rebalance.py)

    def switch_role(self, inst: PrefillInstance | DecodeInstance) -> None:
        """Start draining `inst`; it rejoins in the other role once its KV is gone."""
        if isinstance(inst, PrefillInstance):
            self.prefills.remove(inst)
            for req in inst.drain():     # queued prompts hold no KV yet: they just move
                self.route(req)
        else:
            self.decodes.remove(inst)
            inst.drain()

    def _decode_instance(self, spec: Parallelism, name: str) -> DecodeInstance:
        c = self.config
        return DecodeInstance(self.loop, self.model, spec, self, c.decode_max_batch, name,
                              c.kv_pull_step_cost_s, c.decode_cost_beside_prefill_s,
                              self._prefill_running)

    def _prefill_running(self) -> bool:
        """Whether a prefill instance is running a step now."""
        now = self.loop.now
        return any(p.pipeline.busy_until() > now for p in self.prefills
                   if isinstance(p, PrefillInstance))

    def on_evicted(self, reqs: list[SimRequest], inst: DecodeInstance) -> None:
        """A draining decode instance's requests wait to be pulled, ahead of newer ones."""
        self.pending.extendleft((req, inst) for req in reversed(reqs))
        self.dispatch()

    def on_drained(self, inst: PrefillInstance | DecodeInstance) -> None:
        c, loop = self.config, self.loop
        if isinstance(inst, PrefillInstance):
            self.decodes.append(self._decode_instance(inst.spec, inst.name))
            self.role_switches.append((loop.now, "prefill->decode"))
            self.dispatch()
        else:
            self.prefills.append(PrefillInstance(loop, self.model, inst.spec, self, c.prefill_max_batch,
                                                 c.prefill_max_tokens, inst.name))
            self.role_switches.append((loop.now, "decode->prefill"))

    # ------------------------------------------------------------ migration (pull)

    def dispatch(self) -> None:
        while self.pending:
            req, source = self.pending[0]
            need = req.context_len + 1
            best = None
            for d in self.decodes:
                if d.free_tokens() >= need and \
                        d.waiting_tokens < self.config.decode_waiting_share * d.capacity:
                    if best is None or d.free_tokens() > best.free_tokens():
                        best = d
            if best is None:
                if all(d.used == 0 for d in self.decodes):
                    d = self.decodes[0]
                    raise ValueError(f"a request of {need} KV tokens exceeds the capacity ({d.capacity}) "
                                     f"of decode tp={d.spec.tp} pp={d.spec.pp}; use more GPUs per instance")
                return
            self.pending.popleft()
            best.reserve(req)
            now = self.loop.now
            if source is None:
                self.loop.at(now, self._migrated, req, source, best)
                continue
            # KV exists for every token but the newest one (it is fed at the next step); a
            # cached prefix is held by the decode instance already (prefix-aware routing).
            moved = req.context_len - 1 - req.cached_len
            seconds = (self.config.kv_link_latency_s + self.config.kv_pull_overhead_s
                       + moved * self.kv_bytes_per_token / self.config.kv_link_bytes_per_s)
            req.log(now, "migration_begin")
            best.pulls_in_flight += 1
            if self.config.kv_pull_waits_for_steps and isinstance(source, PrefillInstance):
                self.loop.at(best.step_end_after(now), self._export, req, source, best, seconds)
            else:
                self.loop.at(now + seconds, self._migrated, req, source, best)

    def _export(self, req: SimRequest, source: PrefillInstance, dest: DecodeInstance,
                seconds: float) -> None:
        """The prefill instance gets the ask: it exports once its running step is done."""
        at = max(self.loop.now, source.pipeline.free_at())
        self.loop.at(at, self._receive, req, source, dest, seconds)

    def _receive(self, req: SimRequest, source: PrefillInstance, dest: DecodeInstance,
                 seconds: float) -> None:
        """The export copied the pages, so the prefill instance frees them; the decode
        instance starts the transfer at the end of its current step."""
        source.release(req)
        start = dest.step_end_after(self.loop.now)
        if self.config.kv_transfer_waits_for_source_step:
            self.loop.at(start, self._transfer, req, source, dest, seconds)
        else:
            self.loop.at(start + seconds, self._landed, req, dest)

    def _transfer(self, req: SimRequest, source: PrefillInstance, dest: DecodeInstance,
                  seconds: float) -> None:
        """The transfer starts; its source's running steps hold it back (see SimConfig)."""
        start = max(self.loop.now, source.pipeline.busy_until())
        self.loop.at(start + seconds, self._landed, req, dest)

    def _migrated(self, req: SimRequest, source: PrefillInstance | None, dest: DecodeInstance) -> None:
        if source is not None:
            source.release(req)
            self._landed(req, dest)
        else:
            dest.admit(req)

    def _landed(self, req: SimRequest, dest: DecodeInstance) -> None:
        req.log(self.loop.now, "migration_end")
        dest.pulls_in_flight -= 1
        dest.admit(req)

    # ------------------------------------------------------------ running

    def run(self, reqs: Sequence[HasLengths], arrivals: Iterable[float]) -> list[SimRequest]:
        sims = [SimRequest(i, float(t), int(r.prompt_len), int(r.output_len),
                           int(getattr(r, "cached_len", 0)))
                for i, (r, t) in enumerate(zip(reqs, arrivals))]
        self.num_requests = len(sims)
        for req in sims:
            self.loop.at(req.arrival, self.arrive, req)
        if self.rebalancer:
            self.rebalancer.start()
        self.loop.run()
        if len(self.finished) != len(sims):
            raise RuntimeError(f"simulation stalled: {len(sims) - len(self.finished)} of {len(sims)} "
                               f"requests never finished ({self.config})")
        return sims


def simulate(model: LatencyModel, reqs: Sequence[HasLengths], rate: float,
             config: SimConfig = SimConfig(), seed: int = 0, cv: float = 1.0,
             watcher: Callable[[SimRequest], None] | None = None,
             first_token_watcher: Callable[[SimRequest], None] | None = None) -> list[SimRequest]:
    """Simulate `reqs` arriving at `rate` req/s (gamma gaps, seeded); returns them in input order
    with their recorded times (SimRequest.to_result() gives a dsjax.eval.results.RequestResult).
    `watcher` sees each request as it finishes, `first_token_watcher` as its first token
    comes out (decode-only runs: never); either may raise StopSimulation."""
    return Cluster(model, config, watcher, first_token_watcher).run(
        reqs, poisson_arrivals(len(reqs), rate, seed, cv))
