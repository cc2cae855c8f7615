"""The engine: builds instances from the placement, admits requests, streams their outputs.

    add_request -> least-loaded prefill instance -> first token streamed, KV kept
      -> migration_queue -> a decode instance pulls it (KV device to device) -> tokens streamed
Colocated and chunked modes run one instance that does both phases.
"""
from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from dsjax.engine.block_manager import BlockManager
from dsjax.config import EngineConfig
from dsjax.engine.worker import (ChunkedInstance, ColocatedInstance, DecodeInstance, Instance,
                             PrefillInstance)
from dsjax.executor.kv_cache import bytes_per_block, num_blocks_for_budget
from dsjax.executor.parallel import InstanceSpec, plan_placement
from dsjax.engine.request import Request, RequestOutput, Status
from dsjax.executor.runner import ModelRunner
from dsjax.sampling_params import SamplingParams
from dsjax.engine.scheduler import BatchLimits
from dsjax.engine.stopping import StopChecker
from dsjax.tokenizer import IncrementalDetokenizer, load_tokenizer
from models.attention import XLAAttention
from models.config import OPTConfig
from models.weights import load_params

log = logging.getLogger("dsjax")
GPT2_VOCAB_SIZE = 50257


class EngineError(RuntimeError):
    """An instance failed; pending requests end with this error."""


def resolve_model(model: str, load_format: str) -> tuple[OPTConfig, str | None]:
    """(config, model directory or None) from a directory or a size name (dummy weights only)."""
    path = Path(model)
    if path.is_dir():
        from models.checkpoint import is_orbax_checkpoint
        if (path / "config.json").is_file() or is_orbax_checkpoint(path):
            return OPTConfig.from_hf_dir(path), str(path)
    if load_format != "dummy":
        if path.exists() or "/" in model and not model.startswith("facebook/"):
            raise FileNotFoundError(f"model directory {model} has no config.json: pass a Hugging "
                                    f"Face OPT directory, or a size name with load_format='dummy'")
        raise ValueError(f"{model!r} is not a model directory; a size name like 'opt-125m' "
                         f"needs load_format='dummy' (random weights; no downloads here)")
    return OPTConfig.from_name(model), None


def resolve_dtype(dtype: str, devices=None) -> str:
    """'auto' is bfloat16 where there is an accelerator; on CPU, where bfloat16 is emulated
    and slower, float32."""
    if dtype != "auto":
        return dtype
    platform = (devices or jax.devices())[0].platform
    return "float32" if platform == "cpu" else "bfloat16"


def attention_backend(name: str):
    if name == "xla":
        return XLAAttention()
    try:
        from dsjax.executor.kernels import get_attention_backend
    except ImportError:
        if name == "pallas":
            raise
        return XLAAttention()
    return get_attention_backend(name)


class RequestStream:
    """Iterate over a request's outputs as they come, or wait for the final one."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: queue.Queue = queue.Queue()
        self.final: RequestOutput | None = None

    def put(self, output) -> None:
        self._queue.put(output)

    def __iter__(self):
        while self.final is None:
            out = self._queue.get()
            if isinstance(out, BaseException):
                raise EngineError(str(out)) from out
            if out.finished:
                self.final = out
            yield out

    def result(self, timeout: float | None = None) -> RequestOutput:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.final is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            out = self._queue.get(timeout=remaining)
            if isinstance(out, BaseException):
                raise EngineError(str(out)) from out
            if out.finished:
                self.final = out
        return self.final


class Engine:
    def __init__(self, config: EngineConfig | None = None, devices=None, **overrides):
        config = config or EngineConfig()
        if overrides:
            import dataclasses
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.model_config, model_dir = resolve_model(config.model, config.load_format)
        # GPT-2's BPE is OPT's up to id numbering; it only fits a vocabulary of OPT's size.
        fallback = "gpt2" if self.model_config.vocab_size >= GPT2_VOCAB_SIZE else None
        self.tokenizer = load_tokenizer(config.tokenizer or model_dir, fallback=fallback)
        self.dtype = jnp.dtype(resolve_dtype(config.dtype, devices))
        self.lock = threading.RLock()
        self.requests: dict[str, Request] = {}
        self.migration_queue: deque[Request] = deque()
        self.migrations = {"count": 0, "bytes": 0, "seconds": 0.0}
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)
        self._stopped = threading.Event()
        self._outputs: queue.Queue = queue.Queue()
        self._output_thread = threading.Thread(target=self._output_loop, daemon=True,
                                               name="dsjax-output")
        self._output_thread.start()

        default_devices = devices is None
        specs = plan_placement(config.mode, devices=devices, allow_shared_device=default_devices,
                               **config.placement_kwargs())
        attention = attention_backend(config.attention_backend)

        def params_for(shardings):
            return load_params(model_dir or config.model, self.model_config, self.dtype,
                               load_format=config.load_format, seed=config.seed,
                               shardings=shardings)

        self.prefill_instances: list[Instance] = []
        self.decode_instances: list[Instance] = []
        for spec in specs:
            self._build_instance(spec, params_for, attention)
        self.instances = self.prefill_instances + [i for i in self.decode_instances
                                                   if i not in self.prefill_instances]
        for inst in self.instances:
            inst.start()
        self._status_thread = None
        if config.log_status:
            self._status_thread = threading.Thread(target=self._status_loop, daemon=True,
                                                   name="dsjax-status")
            self._status_thread.start()

    # ---- construction -------------------------------------------------------------------------

    def _build_instance(self, spec: InstanceSpec, params_for, attention) -> None:
        cfg, mc = self.config, self.model_config
        num_blocks = cfg.num_blocks or num_blocks_for_budget(
            mc, block_size=cfg.block_size, dtype=self.dtype, tp=spec.tp, pp=spec.pp,
            devices=spec.devices, gpu_memory_utilization=cfg.gpu_memory_utilization,
            cpu_kv_cache_bytes=cfg.cpu_kv_cache_bytes)
        host_blocks = 0
        if spec.role != "prefill":
            per_block = bytes_per_block(mc, cfg.block_size, self.dtype, 1, 1)
            host_blocks = int(cfg.swap_space * (1 << 30) // per_block)
        limits_p = BatchLimits(cfg.context_max_batch_size, cfg.context_max_tokens_per_batch)
        limits_d = BatchLimits(cfg.decoding_max_batch_size, cfg.decoding_max_tokens_per_batch)
        # The runner's token bound is its largest step: prompts, or a chunked step's budget.
        limits = limits_d if spec.role in ("decode", "chunked") else limits_p
        runner = ModelRunner(spec, mc, params_for, dtype=self.dtype, num_pages=num_blocks,
                             page_size=cfg.block_size, attention=attention,
                             max_batch_size=max(limits.max_batch_size, limits_d.max_batch_size),
                             max_tokens_per_batch=limits.max_tokens_per_batch,
                             max_blocks_per_request=cfg.max_num_blocks_per_req)
        blocks = BlockManager(num_blocks, cfg.block_size, host_blocks)
        if spec.role == "prefill":
            self.prefill_instances.append(PrefillInstance(self, runner, blocks, limits_p))
        elif spec.role == "decode":
            self.decode_instances.append(DecodeInstance(self, runner, blocks, limits_d))
        else:
            if spec.role == "colocated":
                inst = ColocatedInstance(self, runner, blocks, limits_p, limits_d)
            else:
                inst = ChunkedInstance(self, runner, blocks, limits_d)
            self.prefill_instances.append(inst)
            self.decode_instances.append(inst)

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None,
                    arrival_time: float | None = None, stream: bool = True) -> RequestStream:
        """Queue a request; outputs go to on_output (from the engine's output thread) or the
        returned stream: one per token, or only the final one with stream=False."""
        if self.error is not None:
            raise EngineError(f"engine stopped after an instance failed: {self.error}")
        if self._stopped.is_set():
            raise EngineError("engine is shut down")
        params = sampling_params or SamplingParams()
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        self._validate(ids, params)
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        handle = RequestStream(rid)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(32)
        req = Request(rid, text, ids, params, seed, arrival_time, on_output or handle.put)
        req.stream = stream
        req.stop_checker = StopChecker(params, self.model_config.eos_token_id)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            req.text = ""
        with self.lock:
            if rid in self.requests:
                raise ValueError(f"request id {rid!r} is already in use")
            self.requests[rid] = req
            target = min(self.prefill_instances, key=lambda i: i.load())
            target.admit(req)
        return handle

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        mc, cfg = self.model_config, self.config
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
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
        if cfg.mode != "chunked" and len(ids) > cfg.context_max_tokens_per_batch:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds context_max_tokens_per_batch="
                             f"{cfg.context_max_tokens_per_batch}")
        prompt_blocks = -(-len(ids) // cfg.block_size)
        for inst, need in [(i, prompt_blocks) for i in self.prefill_instances] + \
                [(i, blocks) for i in self.decode_instances]:
            if need > inst.blocks.num_total:
                raise ValueError(f"request needs {need} KV blocks but {inst.name_} has only "
                                 f"{inst.blocks.num_total}: lower max_tokens or the prompt, or "
                                 f"give the instance more memory")

    def record_token(self, req: Request, token: int, logprobs, now: float) -> bool:
        """Record a sampled token and decide the conditions that need no text (eos, stop ids,
        length). Called by instances with the lock held; returns True if the request finished.
        Text, stop strings and delivery happen on the output thread, off the step's path."""
        req.output_token_ids.append(token)
        req.token_timestamps.append(now)
        if req.output_logprobs is not None:
            req.output_logprobs.append(logprobs)
        reason = req.stop_checker.check_token(token, len(req.output_token_ids))
        if reason is not None:
            self._finish(req, reason)
        return reason is not None

    def publish(self, requests) -> None:
        """Queue one step's new tokens for delivery (one queue operation per step)."""
        self._outputs.put([(r, len(r.output_token_ids)) for r in requests])

    def _finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.add_event("decoding_end")
        self.requests.pop(req.request_id, None)

    def _output_loop(self) -> None:
        """Detokenize, apply stop strings and hand outputs to consumers, in step order."""
        while True:
            item = self._outputs.get()
            if item is None:
                return
            for req, upto in item:
                try:
                    self._deliver_tokens(req, upto)
                except Exception:  # a broken consumer must not take the engine down
                    log.exception("delivering output of %s failed", req.request_id)

    def _deliver_tokens(self, req: Request, upto: int) -> None:
        if req.delivered_final:
            return
        upto = min(upto, len(req.output_token_ids))
        new_ids = req.output_token_ids[req.num_delivered:upto]
        new_text = None
        if req.detokenizer is not None:
            new_text = "".join(req.detokenizer.feed(t) for t in new_ids)
            req.text += new_text
            cut = (req.stop_checker.check_text(req.text, upto)
                   if req.stop_checker.has_stop_strings else None)
            if cut is not None:
                with self.lock:
                    self._stop_at(req, upto)
                emitted = len(req.text) - len(new_text)
                req.text = req.text[:cut]
                new_text = req.text[emitted:] if cut > emitted else ""
        final = req.finished and upto >= len(req.output_token_ids)
        if final and req.detokenizer is not None and req.finish_reason != "stop":
            tail = req.detokenizer.flush()
            req.text += tail
            new_text = (new_text or "") + tail
        req.num_delivered = upto
        if final or req.stream:
            req.delivered_final = final
            self._call(req, req.to_output(new_ids, new_text, upto))

    def _stop_at(self, req: Request, upto: int) -> None:
        """A stop string ended the output at token `upto`: finish there (the engine may have
        generated past it meanwhile; those tokens are dropped). Lock held."""
        if req.status is Status.ABORTED:
            return
        if not req.finished:
            self._release(req)
            self._finish(req, "stop")
        req.finish_reason = "stop"
        del req.output_token_ids[upto:]
        del req.token_timestamps[upto:]
        if req.output_logprobs is not None:
            del req.output_logprobs[upto:]

    @staticmethod
    def _call(req: Request, output) -> None:
        try:
            req.on_output(output)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("output callback of %s failed", req.request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a request at whatever stage it is and free every block it holds."""
        with self.lock:
            req = self.requests.pop(request_id, None)
            if req is None or req.finished:
                return False
            self._release(req)
            req.status = Status.ABORTED
            req.finish_reason = "abort"
            self._outputs.put([(req, len(req.output_token_ids))])
        return True

    def _release(self, req: Request) -> None:
        """Free the blocks of an unfinished request wherever it is. Lock held. A request inside
        a device step (prefilling, migrating, decoding) is freed by its owner when the step
        returns: the owner sees it finished."""
        status = req.status
        rid = req.request_id
        if status is Status.QUEUED:
            for inst in self.prefill_instances:
                if inst.remove_queued(req) and inst.blocks.holds(rid):
                    inst.blocks.free(rid)  # a partly chunked prompt
        elif status is Status.WAITING_MIGRATION:
            self.migration_queue.remove(req)
            req.prefill_instance.release(req)
        elif status in (Status.DECODING, Status.SWAPPED):
            for inst in self.decode_instances:
                if inst.scheduler.remove(req):
                    inst.blocks.free(rid)
                    inst.swap_space.drop(rid)
        elif status is Status.PREFILLING:
            for inst in self.prefill_instances:
                if isinstance(inst, ChunkedInstance) and inst.remove_queued(req):
                    inst.blocks.free(rid)
        # MIGRATING: the pulling decode instance frees both sides when the copy ends.

    def fail_all(self, error: BaseException) -> None:
        with self.lock:
            self.error = error
            for req in list(self.requests.values()):
                self._call(req, error)
            self.requests.clear()

    def wake_decoders(self) -> None:
        for inst in self.decode_instances:
            inst.wakeup.set()

    def record_migration(self, nbytes: int, seconds: float) -> None:
        self.migrations["count"] += 1
        self.migrations["bytes"] += nbytes
        self.migrations["seconds"] += seconds

    # ---- state --------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        with self.lock:
            return bool(self.requests)

    def stats(self) -> list[dict]:
        with self.lock:
            return [{"instance": i.name_, **i.counts(), "blocks_used": i.blocks.num_used,
                     "blocks_total": i.blocks.num_total} for i in self.instances]

    def blocks_in_use(self) -> dict[str, int]:
        """Device and host blocks held per instance (all zero when idle: nothing leaked)."""
        with self.lock:
            return {i.name_: i.blocks.num_used + (i.blocks.host.num_used if i.blocks.host else 0)
                    for i in self.instances}

    def status_lines(self, elapsed: float) -> list[str]:
        with self.lock:
            return [i.status(elapsed) for i in self.instances]

    def _status_loop(self) -> None:
        last = time.monotonic()
        while not self._stopped.wait(self.config.status_interval):
            now = time.monotonic()
            for line in self.status_lines(now - last):
                log.info(line)
            last = now

    def shutdown(self) -> None:
        self._stopped.set()
        for inst in self.instances:
            inst.stop()
        for inst in self.instances:
            if inst.is_alive():
                inst.join(timeout=10)
        with self.lock:
            for req in list(self.requests.values()):
                req.status = Status.ABORTED
                req.finish_reason = "abort"
                self._outputs.put([(req, len(req.output_token_ids))])
            self.requests.clear()
        self._outputs.put(None)
        self._output_thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
