"""The engine: places instances, admits requests, routes messages, delivers outputs.

    add_request -> router -> AddRequest -> least-loaded prefill instance
      prefill: first token streamed, KV kept; Report.prefilled -> router -> OfferMigration
      decode (when it has room): ExportKV -> prefill -> KVReady -> decode -> tokens streamed
Colocated and chunked modes run one instance that does both phases.

One router thread owns every caller-facing request record (dsjax.engine.delivery) and the
routing tables; instances own their requests' scheduling state (dsjax.engine.worker). Callers,
instances and the router talk only through queues of dsjax.engine.messages.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
from pathlib import Path
from typing import Callable

from dsjax.config import EngineConfig
from dsjax.engine.block_manager import block_hashes
from dsjax.engine.delivery import TrackedRequest
from dsjax.engine.prefix_router import PrefixIndex, pick_by_prefix
from dsjax.engine.messages import (AbortRequest, AddRequest, ExportKV, InstanceFailed,
                                   InstanceReady, KVReady, KVRefused, OfferMigration, PeerMessage,
                                   Report, RequestSpec)
from dsjax.engine.request import RequestOutput, sequence_seed
from dsjax.engine.startup_heap import freeze_startup_heap, release_startup_heap
from dsjax.executor.hosts import host_backend
from dsjax.sampling_params import SamplingParams
from dsjax.tokenizer import IncrementalDetokenizer, model_tokenizer
from dsjax.models.base import ModelConfig
from dsjax.models.registry import config_from_dir, config_from_name

log = logging.getLogger("dsjax")
PROMPT_ROLES = ("prefill", "colocated", "chunked")
DECODE_ROLES = ("decode", "colocated", "chunked")
# KV transfers kept for fitting the simulator's link: the latest this many.
KV_TRANSFER_SAMPLES = 4096


class EngineError(RuntimeError):
    """The engine cannot serve (stopped, or no instance left for a phase), or a request failed
    inside it."""


def resolve_model(model: str, load_format: str) -> tuple[ModelConfig, str | None]:
    """(config, model directory or None) from a directory (any supported family, picked by
    its config.json's model_type) or a size name (dummy weights only)."""
    path = Path(model)
    if path.is_dir():
        from dsjax.models.checkpoint import is_orbax_checkpoint
        if (path / "config.json").is_file() or is_orbax_checkpoint(path):
            return config_from_dir(path), str(path)
    if load_format != "dummy":
        if path.exists() or "/" in model and not model.startswith("facebook/"):
            raise FileNotFoundError(f"model directory {model} has no config.json: pass a Hugging "
                                    f"Face model directory, or a size name with "
                                    f"load_format='dummy'")
        raise ValueError(f"{model!r} is not a model directory; a size name like 'opt-125m' or "
                         f"'llama-3.1-8b' needs load_format='dummy' (random weights; no "
                         f"downloads here)")
    return config_from_name(model), None


class RequestStream:
    """Iterate over a request's outputs as they come, or wait for the final one.

    Any number of threads may wait: each output goes to one iterator, and the final output
    wakes every waiter, so `result()` beside an iterating thread cannot miss it."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._pending: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self.final: RequestOutput | None = None
        self._failure: BaseException | None = None   # the engine's error, seen by every waiter

    def put(self, output) -> None:
        with self._ready:
            self._pending.append(output)
            self._ready.notify_all()

    def _next(self, timeout: float | None = None) -> RequestOutput | None:
        """The next output, or None once another waiter has taken the final one."""
        with self._ready:
            if not self._ready.wait_for(
                    lambda: self._pending or self.final is not None or self._failure, timeout):
                raise TimeoutError(f"request {self.request_id}: no output within {timeout:.1f} s")
            if not self._pending:
                if self._failure is not None:
                    raise EngineError(str(self._failure)) from self._failure
                return None
            out = self._pending.popleft()
            if isinstance(out, BaseException):
                self._failure = out
                self._ready.notify_all()
                raise EngineError(str(out)) from out
            if out.finished:
                self.final = out
                self._ready.notify_all()
            return out

    def __iter__(self):
        while self.final is None:
            out = self._next()
            if out is not None:
                yield out

    def result(self, timeout: float | None = None) -> RequestOutput:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.final is None:
            self._next(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.final


class _Instance:
    """The router's view of one instance: its host, liveness, capacity and latest stats."""

    def __init__(self, name: str, role: str, host):
        self.name, self.role, self.host = name, role, host
        self.alive = True
        self.error: str | None = None
        self.num_blocks = 0
        self.stats: dict = {"instance": name, "role": role}
        self.outstanding = 0   # routed work not yet done: prompt tokens (prefill), KV (decode)
        self.prefix: PrefixIndex | None = None   # what its prefix cache is believed to hold


class _Add:
    def __init__(self, tracked: TrackedRequest, spec: RequestSpec):
        self.tracked, self.spec = tracked, spec


class _UserAbort:
    def __init__(self, request_id: str):
        self.request_id = request_id


_STOP = object()


class Engine:
    def __init__(self, config: EngineConfig | None = None, devices=None, **overrides):
        config = config or EngineConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.model_config, model_dir = resolve_model(config.model, config.load_format)
        self.tokenizer = model_tokenizer(config.tokenizer or model_dir, self.model_config)
        self.migrations = {"count": 0, "bytes": 0, "seconds": 0.0}
        # (bytes, seconds) of the latest KV transfers alone, for fitting the simulator's link
        # (dsjax.eval.engine_fit.fit_link); the waits for step ends around them are not in it.
        self.kv_transfers: collections.deque = collections.deque(maxlen=KV_TRANSFER_SAMPLES)
        self.recomputations = 0   # request parts recomputed after an instance died
        self.error: EngineError | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._tracked: dict[str, TrackedRequest] = {}   # router thread only
        # Callers' request ids in use -> the engine's own id for each. Instances see only the
        # engine's ids (unique, never parsed), so no caller id can collide with another
        # request's, or with a sequence's of an n > 1 request.
        self._live: dict[str, str] = {}
        self._live_lock = threading.Lock()
        self._internal_ids = itertools.count()
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)
        self._stopped = threading.Event()
        self.instances: dict[str, _Instance] = {}
        self._holds_heap = False   # (see dsjax.engine.startup_heap)
        self._heap_lock = threading.Lock()   # one release per engine, whoever shuts it down
        self._start_instances(devices, model_dir)
        self._router = threading.Thread(target=self._route_loop, daemon=True,
                                        name="dsjax-router")
        self._router.start()
        self._status_thread = None
        if config.log_status:
            self._status_thread = threading.Thread(target=self._status_loop, daemon=True,
                                                   name="dsjax-status")
            self._status_thread.start()
        log.info("start-up heap frozen in %.2f s", freeze_startup_heap())
        self._holds_heap = True

    # ---- construction -------------------------------------------------------------------------

    def _start_instances(self, devices, model_dir) -> None:
        backend = host_backend(self.config.distributed_executor_backend)
        for host in backend.launch(self.config, self.model_config, model_dir, devices,
                                   self._inbox.put):
            self.instances[host.name] = _Instance(host.name, host.role, host)
            host.start()
        self._await_ready()

    def _await_ready(self) -> None:
        """Wait for every instance to load and compile; any that cannot start stops the engine
        before it serves (a half-built engine is a configuration error, not a fault)."""
        waiting = set(self.instances)
        errors = []
        while waiting:
            msg = self._inbox.get()
            if isinstance(msg, InstanceReady):
                self.instances[msg.instance].num_blocks = msg.num_blocks
                self.instances[msg.instance].prefix = PrefixIndex(msg.num_blocks)
                self.instances[msg.instance].stats = msg.stats or {}
                waiting.discard(msg.instance)
            elif isinstance(msg, InstanceFailed):
                errors.append(f"{msg.instance}: {msg.error}")
                waiting.discard(msg.instance)
            elif isinstance(msg, Report):
                self.instances[msg.instance].stats = msg.stats or {}
        if errors:
            self._stop_hosts()
            raise EngineError("could not start the engine: " + "; ".join(errors))

    # ---- requests (any thread) ----------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None,
                    arrival_time: float | None = None, stream: bool = True,
                    cache_salt: str | None = None) -> RequestStream:
        """Queue a request; outputs go to on_output (from the engine's router thread) or the
        returned stream: one per report of new tokens (a step's, or a few steps'), or only the
        final one with stream=False. A request that fails inside the engine delivers an
        exception instead (the stream raises EngineError). cache_salt: only requests with the
        same salt share prefix-cache blocks."""
        self._check_serving()
        params = sampling_params or SamplingParams()
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        self._validate(ids, params)
        if stream and params.num_samples > params.n:
            raise ValueError(f"best_of={params.best_of} > n={params.n} cannot be streamed: the "
                             f"best sequences are known only at the end; set stream off or "
                             f"best_of equal to n")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        handle = RequestStream(rid)
        # The check, the id and the queueing happen under the lock shutdown() takes, so a
        # request is either refused or queued before the router's stop (never lost behind it).
        with self._live_lock:
            self._check_serving()
            if rid in self._live:
                raise ValueError(f"request id {rid!r} is already in use")
            internal = f"r{next(self._internal_ids)}"
            self._live[rid] = internal
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(32)
            tracked = TrackedRequest(rid, text, ids, params, on_output or handle.put, stream,
                                     self._detokenizer_factory(params),
                                     self.model_config.eos_token_ids, arrival_time)
            tracked.internal_id = internal
            tracked.spec = RequestSpec(internal, tuple(ids), params, seed, cache_salt)
            self._inbox.put(_Add(tracked, tracked.spec))
        return handle

    def _detokenizer_factory(self, params: SamplingParams):
        if self.tokenizer is None:
            return lambda: None
        return lambda: IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)

    def _check_serving(self) -> None:
        if self._stopped.is_set():
            raise EngineError("engine is shut down")
        if self.error is not None:
            raise EngineError(str(self.error))

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        mc, cfg = self.model_config, self.config
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        for what, tokens in (("prompt token ids", ids),
                             ("logit_bias token ids", [t for t, _ in params.logit_bias])):
            bad = [t for t in tokens if not 0 <= t < mc.vocab_size]
            if bad:
                raise ValueError(f"{what} {bad[:5]} are outside the vocabulary "
                                 f"[0, {mc.vocab_size})")
        total = len(ids) + params.max_tokens
        if total > mc.max_position_embeddings:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{total} exceeds the model's context of "
                             f"{mc.max_position_embeddings} tokens: shorten the prompt or lower "
                             f"max_tokens")
        blocks = -(-total // cfg.block_size)
        if blocks > cfg.max_num_blocks_per_req:
            raise ValueError(f"request needs {blocks} KV blocks of {cfg.block_size} tokens, over "
                             f"max_num_blocks_per_req={cfg.max_num_blocks_per_req}")
        if cfg.mode == "chunked" and params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs (echo with logprobs) is not supported in chunked "
                             "mode: the prompt is scored in pieces; use disaggregated or "
                             "colocated mode")
        if params.num_samples > cfg.decoding_max_batch_size:
            raise ValueError(f"n / best_of of {params.num_samples} exceeds "
                             f"decoding_max_batch_size={cfg.decoding_max_batch_size}: its "
                             f"sequences decode together; lower n or raise the batch limit")
        if cfg.mode != "chunked" and len(ids) > cfg.context_max_tokens_per_batch:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds context_max_tokens_per_batch="
                             f"{cfg.context_max_tokens_per_batch}")
        prompt_blocks = -(-len(ids) // cfg.block_size)
        for inst in self.instances.values():
            need = blocks if inst.role in DECODE_ROLES else prompt_blocks
            if need > inst.num_blocks:
                raise ValueError(f"request needs {need} KV blocks but {inst.name} has only "
                                 f"{inst.num_blocks}: lower max_tokens or the prompt, or give "
                                 f"the instance more memory")

    def abort(self, request_id: str) -> bool:
        """Stop a request at whatever stage it is; its owner frees every block it holds.
        Returns False if no such request is running."""
        with self._live_lock:
            internal = self._live.get(request_id)
        if internal is None:
            return False
        self._inbox.put(_UserAbort(internal))
        return True

    # ---- the router thread --------------------------------------------------------------------

    def _route_loop(self) -> None:
        while True:
            msg = self._inbox.get()
            if msg is _STOP:
                return
            try:
                self._route(msg)
            except Exception:  # noqa: BLE001 - one bad message must not stop the engine
                log.exception("routing %s failed", type(msg).__name__)

    def _route(self, msg) -> None:
        if isinstance(msg, Report):
            self._on_report(msg)
        elif isinstance(msg, PeerMessage):
            self._on_peer(msg)
        elif isinstance(msg, _Add):
            self._on_add(msg.tracked, msg.spec)
        elif isinstance(msg, _UserAbort):
            tracked = self._tracked.get(msg.request_id)
            if tracked is not None:
                tracked.abort()
                self._end(tracked, drop_from=tracked.location)
        elif isinstance(msg, InstanceFailed):
            self._on_instance_failed(msg.instance, msg.error)

    def _pick(self, roles, weight: int, avoid=()) -> _Instance | None:
        alive = [i for i in self.instances.values() if i.alive and i.role in roles]
        alive = [i for i in alive if i.name not in avoid] or alive
        if not alive:
            return None
        best = min(alive, key=lambda i: i.outstanding)
        best.outstanding += weight
        return best

    def _pick_prompt_instance(self, spec: RequestSpec, avoid=()) -> _Instance | None:
        """Least loaded, with prefix caching: the least prompt work once each instance's
        (believed) cached prefix of this prompt is discounted. `avoid`: instances to skip
        while others live (one that just lost this request's KV)."""
        n = len(spec.prompt_token_ids)
        alive = [i for i in self.instances.values() if i.alive and i.role in PROMPT_ROLES]
        alive = [i for i in alive if i.name not in avoid] or alive
        if len(alive) < 2 or not self.config.enable_prefix_caching:
            return self._pick(PROMPT_ROLES, n, avoid)
        hashes = block_hashes(spec.prompt_token_ids, self.config.block_size, spec.cache_salt)
        matched = {i.name: i.prefix.match(hashes) for i in alive}
        best = pick_by_prefix(alive, n, matched, self.config.block_size)
        best.outstanding += n
        best.prefix.add(hashes)
        return best

    def _on_add(self, tracked: TrackedRequest, spec: RequestSpec, index: int | None = None,
                avoid=()) -> None:
        """Route one part of a request (the whole of it, or after a recompute one sequence)."""
        self._tracked[spec.request_id] = tracked
        tracked.parts[spec.request_id] = index
        target = self._pick_prompt_instance(spec, avoid)
        if target is None:
            self._fail(tracked, EngineError("no instance left that runs prompts"))
            return
        tracked.where[spec.request_id] = {target.name}
        if not tracked.queued:
            tracked.queued = True
        target.host.send(AddRequest(spec))

    def _on_report(self, report: Report) -> None:
        inst = self.instances[report.instance]
        if report.stats:
            inst.stats = report.stats
        for nbytes, seconds, transfer_s in report.migrations:
            self.migrations["count"] += 1
            self.migrations["bytes"] += nbytes
            self.migrations["seconds"] += seconds
            self.kv_transfers.append((nbytes, transfer_s))
        for event in report.events:
            tracked = self._tracked.get(event.request_id)
            if tracked is not None:
                tracked.add_event(event.event_type, event.timestamp)
        for rid, entries in report.prompt_logprobs:
            tracked = self._tracked.get(rid)
            if tracked is not None:
                tracked.prompt_logprobs = [None, *entries]
        for rid, cached in report.cached_tokens:
            tracked = self._tracked.get(rid)
            if tracked is not None:
                tracked.num_cached_tokens = cached
        self._deliver_tokens(report.tokens, inst)
        for offer in report.prefilled:
            self._on_prefilled(offer, inst)
        for failure in report.failed:
            tracked = self._tracked.get(failure.request_id)
            if tracked is None:
                continue
            why = f"request {tracked.request_id} failed in {report.instance}: {failure.error}"
            if not (failure.retryable and self._recompute(tracked, why)):
                self._fail(tracked, EngineError(why))   # _end gives back its routing weight

    def _deliver_tokens(self, steps, inst: _Instance) -> None:
        """A report's tokens (StepTokens): each request's added in order, then delivered once.
        A request whose tokens cannot be recorded or delivered (detokenizing, bookkeeping: a
        consumer's callback is contained already) fails alone; the others are delivered."""
        touched: dict[TrackedRequest, str] = {}   # each request, with the first id it came by
        broken: dict[TrackedRequest, Exception] = {}
        for step in steps:
            indexes, tokens, logprobs = step.indexes, step.token_ids, step.logprobs
            tops, finish, timestamp = step.top_logprobs, step.finish_reasons, step.timestamp
            for row, rid in enumerate(step.request_ids):
                tracked = self._tracked.get(rid)
                if tracked is None or tracked in broken:
                    continue
                if tracked not in touched:
                    touched[tracked] = rid
                    self._first_token(tracked, inst)
                index = tracked.parts.get(rid)   # a resumed sequence runs as its own request
                try:
                    tracked.add_token(indexes[row] if index is None else index, tokens[row],
                                      logprobs[row], None if tops is None else tops[row],
                                      timestamp, finish.get(row))
                except Exception as e:  # noqa: BLE001 - this request fails, the rest go on
                    broken[tracked] = e
        for tracked, rid in touched.items():
            try:
                if tracked in broken:
                    raise broken[tracked]
                stopped = tracked.deliver()
            except Exception as e:  # noqa: BLE001
                log.exception("delivering the tokens of %s failed", tracked.request_id)
                self._fail(tracked, EngineError(f"request {tracked.request_id}: delivering its "
                                                f"tokens failed: {type(e).__name__}: {e}"))
                continue
            tracked.stopped.update(stopped)
            if tracked.finished:   # instances drop what a stop string ended; they freed the rest
                self._end(tracked, drop_from=tracked.location if stopped else ())
                continue
            for i in stopped:
                # A request runs either whole (under `rid`, sequence i inside it) or, after a
                # recompute, as one part per resumed sequence: never both.
                part = next((p for p, j in tracked.parts.items() if j == i), None)
                message = AbortRequest(part) if part else AbortRequest(rid, i)
                for name in tracked.where.get(part or rid, ()):
                    self.instances[name].host.send(message)

    def _first_token(self, tracked: TrackedRequest, inst: _Instance) -> None:
        """The prompt left the admission queue (its first token came)."""
        if not tracked.queued:
            return
        tracked.queued = False
        n = len(tracked.prompt_token_ids)
        inst.outstanding = max(0, inst.outstanding - n)

    def _on_prefilled(self, offer, source: _Instance) -> None:
        tracked = self._tracked.get(offer.spec.request_id)
        if tracked is None:   # ended while its first token was on the way
            source.host.send(AbortRequest(offer.spec.request_id))
            return
        weight = len(offer.spec.prompt_token_ids) + offer.spec.params.max_tokens
        dest = self._pick(("decode",), weight)
        if dest is None:
            self._fail(tracked, EngineError("no decode instance left"))
            return
        tracked.where.setdefault(offer.spec.request_id, set()).add(dest.name)
        tracked.prefilled_on = source.name
        tracked.decode_weight = weight
        dest.host.send(OfferMigration(offer))

    def _on_peer(self, peer: PeerMessage) -> None:
        msg = peer.message
        dest = self.instances.get(peer.dest)
        tracked = self._tracked.get(msg.request_id)
        if isinstance(msg, KVReady) and tracked is not None:
            tracked.where[msg.request_id] = {peer.dest}   # the prefill side let go of it
        elif isinstance(msg, KVRefused) and tracked is not None:
            # A live request whose KV cannot be had is lost: fail it rather than let it hang.
            self._fail(tracked, EngineError(f"request {tracked.request_id} lost its KV cache: "
                                            f"{msg.reason}"))
        if dest is not None and dest.alive:
            dest.host.send(msg)
        elif isinstance(msg, ExportKV):       # its prefill instance is gone: tell the puller
            self._on_peer(PeerMessage(msg.dest, KVRefused(msg.request_id,
                                                          f"{peer.dest} has failed")))

    def _end(self, tracked: TrackedRequest, drop_from=()) -> None:
        """Forget a finished request; instances in drop_from are told to free it."""
        rid = tracked.internal_id
        self._tracked.pop(rid, None)
        for part in tracked.parts:
            self._tracked.pop(part, None)
            for name in drop_from:
                inst = self.instances.get(name)
                if inst is not None and inst.alive:
                    inst.host.send(AbortRequest(part))
        queued_tokens = len(tracked.prompt_token_ids) if tracked.queued else 0
        if tracked.queued:
            tracked.queued = False
        for name in tracked.location:
            inst = self.instances.get(name)
            if inst is not None:
                done = tracked.decode_weight if inst.role == "decode" else queued_tokens
                inst.outstanding = max(0, inst.outstanding - done)
        with self._live_lock:
            if self._live.get(tracked.request_id) == rid:
                del self._live[tracked.request_id]

    def _fail(self, tracked: TrackedRequest, error: EngineError) -> None:
        tracked.fail(error)
        self._end(tracked, drop_from=tracked.location)

    def _on_instance_failed(self, name: str, error: str) -> None:
        inst = self.instances[name]
        if not inst.alive:
            return
        inst.alive, inst.error = False, error
        inst.prefix = None   # its cache died with it
        log.error("instance %s failed: %s", name, error)
        # The engine's own failure is set before any request hears of this one: a caller
        # told its request failed must find health() saying whether a retry can be served.
        prompts = any(i.alive for i in self.instances.values() if i.role in PROMPT_ROLES)
        decodes = any(i.alive for i in self.instances.values() if i.role in DECODE_ROLES)
        if not (prompts and decodes):
            self.error = EngineError(f"no instance left for a phase after {name} failed: "
                                     f"{error}")
        hit = {id(t): t for t in self._tracked.values() if name in t.location}
        for tracked in hit.values():
            for places in tracked.where.values():
                places.discard(name)
            why = f"request {tracked.request_id} failed: instance {name} stopped ({error})"
            if not self._recompute(tracked, why):
                self._fail(tracked, EngineError(why))

    def _recompute(self, tracked: TrackedRequest, why: str) -> bool:
        """Continue a request whose instance died (or whose KV was lost) on live instances, as
        vLLM's preemption by recompute does: each unfinished sequence is prefilled again with
        the tokens it has streamed (whose KV is recomputed with the prompt) and decodes on;
        the caller's stream goes on with no gap and no duplicate. False when it cannot be
        (turned off, or no live instance for a phase): the caller then fails it."""
        alive = [i for i in self.instances.values() if i.alive]
        if not (self.config.recompute_on_failure
                and any(i.role in PROMPT_ROLES for i in alive)
                and any(i.role in DECODE_ROLES for i in alive)):
            return False
        log.warning("%s: recomputing it on live instances", why)
        for part, places in tracked.where.items():   # what live instances still hold
            for name in places:
                self.instances[name].host.send(AbortRequest(part))
        for part in tracked.parts:
            self._tracked.pop(part, None)
        tracked.parts, tracked.where = {}, {}
        tracked.recomputed += 1
        self.recomputations += 1
        spec = tracked.spec
        avoid = {tracked.prefilled_on} if tracked.prefilled_on else set()
        if not tracked.has_tokens:   # nothing streamed yet: the request again, whole
            self._on_add(tracked, dataclasses.replace(spec, request_id=self._new_part_id()),
                         avoid=avoid)
            return True
        single = dataclasses.replace(spec.params, n=1, best_of=None)
        for i, seq in enumerate(tracked.sequences):
            if seq.finished:
                continue
            tokens = tuple(seq.token_ids)
            part = RequestSpec(self._new_part_id(), spec.prompt_token_ids + tokens, single,
                               sequence_seed(spec.seed, i), spec.cache_salt, tokens)
            self._on_add(tracked, part, index=i, avoid=avoid)
        return True

    def _new_part_id(self) -> str:
        return f"r{next(self._internal_ids)}"

    # ---- state (any thread) -------------------------------------------------------------------

    def engine_id(self, request_id: str) -> str | None:
        """The id the instances know a caller's running request by (fault injection, logs)."""
        with self._live_lock:
            return self._live.get(request_id)

    def caller_id(self, engine_id: str) -> str | None:
        """The caller's id of the request the instances know as engine_id (a sequence's id
        names its request's)."""
        base = engine_id.split("#")[0]
        with self._live_lock:
            return next((c for c, e in self._live.items() if e == base), None)

    def has_unfinished(self) -> bool:
        with self._live_lock:
            return bool(self._live)

    def stats(self) -> list[dict]:
        """Per instance: running/waiting/swapped requests, KV blocks used and total, ..."""
        empty = {"running": 0, "waiting": 0, "swapped": 0, "blocks_used": 0}
        return [{**empty, **i.stats, "instance": i.name, "blocks_total": i.num_blocks,
                 "alive": i.alive} for i in self.instances.values()]

    def blocks_in_use(self) -> dict[str, int]:
        """Device and host blocks held per live instance (all zero when idle: nothing leaked)."""
        return {i.name: i.stats.get("blocks_used", 0) + i.stats.get("host_blocks_used", 0)
                for i in self.instances.values() if i.alive}

    def health(self) -> dict:
        """{"ok": whether the engine can serve, "instances": {name: "ok" | "failed: why"}}."""
        return {"ok": self.error is None and not self._stopped.is_set(),
                "instances": {i.name: "ok" if i.alive else f"failed: {i.error}"
                              for i in self.instances.values()}}

    def status_lines(self, elapsed: float, previous: dict[str, int]) -> list[str]:
        """One DistServe-style status line per instance; `previous` holds token counts seen
        at the last call (updated here) to turn them into rates."""
        lines = []
        for inst in self.instances.values():
            s = inst.stats
            tokens = s.get("tokens", 0)
            rate = (tokens - previous.get(inst.name, tokens)) / max(elapsed, 1e-9)
            previous[inst.name] = tokens
            state = "" if inst.alive else f" | FAILED: {inst.error}"
            lines.append(f"[{inst.name}] running {s.get('running', 0)} | waiting "
                         f"{s.get('waiting', 0)} | swapped {s.get('swapped', 0)} | KV blocks "
                         f"{s.get('blocks_used', 0)}/{inst.num_blocks} | {rate:.1f} tokens/s"
                         f"{state}")
        return lines

    def _status_loop(self) -> None:
        last, seen = time.monotonic(), {}
        while not self._stopped.wait(self.config.status_interval):
            now = time.monotonic()
            for line in self.status_lines(now - last, seen):
                log.info(line)
            last = now

    def local_worker(self, name: str):
        """The worker object of an in-process ("uni") instance, for fault injection in tests
        and per-step timing in benchmarks; None for instances in other processes."""
        return getattr(self.instances[name].host, "worker", None)

    # ---- shutdown -----------------------------------------------------------------------------

    def _stop_hosts(self) -> None:
        for inst in self.instances.values():
            inst.host.stop()

    def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._stop_hosts()
        self._inbox.put(_STOP)
        self._router.join(timeout=10)
        for tracked in list(self._tracked.values()):
            tracked.abort()
            self._end(tracked)
        with self._heap_lock:
            holds, self._holds_heap = self._holds_heap, False
        if holds:
            release_startup_heap()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

