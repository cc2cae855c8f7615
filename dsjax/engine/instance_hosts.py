"""Where an instance worker lives: a thread of the engine's process, or a process of its own.

`--distributed-executor-backend` (vLLM's flag name) picks the host:
- "uni": every instance is a thread of the engine's process on its own disjoint mesh; KV moves
  device to device with `device_put`, shard by shard (the default).
- "mp": every instance is an OS process with its own JAX runtime and its own devices (on CPU:
  its own virtual devices, pinned to its own cores). KV moves over JAX transfer servers bound to
  `kv_transfer_host`. Messages cross by a multiprocessing queue (in) and a pipe (out); the KV
  never does.
- "ray": every instance is a Ray actor, possibly on another host (dsjax.engine.ray_hosts); it
  runs the same process body as an "mp" child (`serve_in_process`).

Every host runs the same `InstanceWorker` code built by `build_worker`, behind the interface
of dsjax.executor.hosts (which picks the backend by name).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from typing import Callable

from dsjax.engine.messages import InstanceFailed, InstanceReady, Shutdown
from dsjax.executor.hosts import (STOP_TIMEOUT_S, HostEnded, InstanceHost, RemoteHost,
                                  devices_needed, start_heartbeat)
from dsjax.executor.parallel import plan_placement

log = logging.getLogger("dsjax")


def resolve_dtype(dtype: str, devices) -> str:
    """'auto' is bfloat16 where there is an accelerator; on CPU, where bfloat16 is emulated
    and slower, float32."""
    if dtype != "auto":
        return dtype
    return "float32" if devices[0].platform == "cpu" else "bfloat16"


def compilation_cache_path(setting: str) -> str | None:
    if not setting:
        return None
    if setting != "auto":
        return os.path.expanduser(setting)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "dsjax", "jax")


def configure_jax(config) -> None:
    """Process-wide JAX settings an engine needs: the persistent compilation cache (unless the
    user set one up already), caching every program however quick its compile."""
    import jax
    path = compilation_cache_path(config.compilation_cache_dir)
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def with_cpu_kv_budget(config, plans, per_device: Callable[[int], int] | None = None):
    """config with cpu_kv_cache_bytes resolved once for the whole engine when it is 0 (auto):
    each instance sizing its own from free memory would see what the others already took.
    `per_device(devices)`: the budget per device of an engine of that many devices (by
    default kv_cache.auto_cpu_kv_bytes, from this machine's free memory). With a compilation
    cache, a restart keeps the last start's budget while free memory drifts by less than a
    granule (kv_cache.steady_cpu_kv_bytes), so its programs load."""
    if config.cpu_kv_cache_bytes:
        return config
    import jax

    from dsjax.executor.kv_cache import auto_cpu_kv_bytes, steady_cpu_kv_bytes
    per_device = per_device or auto_cpu_kv_bytes
    devices = sum(plan.num_devices for plan in plans)
    # Where the program store is, by configure_jax's rule: JAX's cache where one is set up
    # already, else the setting's (the driver of child processes has not configured JAX).
    setting = compilation_cache_path(config.compilation_cache_dir)
    directory = setting and (jax.config.jax_compilation_cache_dir or setting)
    return dataclasses.replace(config, cpu_kv_cache_bytes=steady_cpu_kv_bytes(
        per_device(devices), devices, directory))


def params_loader(config, model_config, model_dir, dtype) -> Callable:
    """shardings -> the model's params placed on them, from the configured checkpoint."""
    from dsjax.models.weights import load_params

    def params_for(shardings):
        return load_params(model_dir or config.model, model_config, dtype,
                           load_format=config.load_format, seed=config.seed,
                           shardings=shardings)
    return params_for


def build_worker(plan, config, model_config, model_dir, devices, send, kv_link,
                 place_stages=None, pull_sources=None):
    """The worker of one instance on `devices` (the devices its process sees): runner with its
    params and page pool, block tables, scheduler; its programs compiled before it serves.
    `place_stages`: the runner's hook for stages in other processes (Ray stage actors).
    `pull_sources`: a decode instance's prefill instances (kv_migration.SourceLayout), whose
    pulls warm-up compiles; default: the configured prefill layout, pulled onto this
    instance's first device (instances in other processes)."""
    import jax.numpy as jnp

    from dsjax.engine.block_manager import BlockManager
    from dsjax.engine.colocated_worker import ChunkedWorker, ColocatedWorker
    from dsjax.engine.decode_worker import DecodeWorker
    from dsjax.engine.prefill_worker import PrefillWorker
    from dsjax.engine.scheduler import BatchLimits
    from dsjax.executor.kernels import get_attention_backend
    from dsjax.executor.kv_cache import bytes_per_block, num_blocks_for_budget
    from dsjax.executor.parallel import InstanceSpec
    from dsjax.executor.runner import ModelRunner
    from dsjax.executor.kv_migration import SourceLayout
    from dsjax.executor.warmup import measure_prefill_budget, warm_up_pulls, warm_up_runner

    cfg, mc = config, model_config
    spec = InstanceSpec.bind(plan, devices)
    dtype = jnp.dtype(resolve_dtype(cfg.dtype, spec.devices))
    num_blocks = cfg.num_blocks or num_blocks_for_budget(
        mc, block_size=cfg.block_size, dtype=dtype, tp=spec.tp, pp=spec.pp,
        devices=spec.devices, gpu_memory_utilization=cfg.gpu_memory_utilization,
        cpu_kv_cache_bytes=cfg.cpu_kv_cache_bytes)
    host_blocks = 0
    if spec.role != "prefill":
        per_block = bytes_per_block(mc, cfg.block_size, dtype, 1, 1)
        host_blocks = int(cfg.swap_space * (1 << 30) // per_block)
    limits_p = BatchLimits(cfg.context_max_batch_size, cfg.context_max_tokens_per_batch)
    limits_d = BatchLimits(cfg.decoding_max_batch_size, cfg.decoding_max_tokens_per_batch)
    # The runner's token bound is its largest step: prompts, or a chunked step's budget.
    limits = limits_d if spec.role in ("decode", "chunked") else limits_p

    runner = ModelRunner(spec, mc, params_loader(cfg, mc, model_dir, dtype), dtype=dtype,
                         num_pages=num_blocks,
                         page_size=cfg.block_size,
                         attention=get_attention_backend(
                             cfg.attention_backend, num_heads=mc.num_attention_heads // spec.tp,
                             num_kv_heads=mc.cache_kv_heads(spec.tp) // spec.tp,
                             head_dim=mc.head_dim, page_size=cfg.block_size, dtype=dtype,
                             sliding_window=mc.sliding_window),
                         max_batch_size=max(limits.max_batch_size, limits_d.max_batch_size),
                         max_tokens_per_batch=limits.max_tokens_per_batch,
                         # No request outlives the model's context (the engine checks).
                         max_blocks_per_request=min(
                             cfg.max_num_blocks_per_req,
                             -(-mc.max_position_embeddings // cfg.block_size)),
                         place_stages=place_stages, min_decode_rows=cfg.min_decode_rows)
    started = time.perf_counter()
    steps = warm_up_runner(runner, spec.role, cfg)
    # (the page count is every step program's shape: a warm start that compiles again has
    # likely seen another one)
    log.info("%s: warm-up made %d step shapes ready in %.1f s (%d KV pages)", spec.name, steps,
             time.perf_counter() - started, num_blocks)
    if spec.role == "decode":
        started = time.perf_counter()
        sources = pull_sources if pull_sources is not None else [SourceLayout(
            cfg.context_tensor_parallel_size, cfg.context_pipeline_parallel_size)]
        pulls = warm_up_pulls(runner, sources, cfg)
        if pulls:
            log.info("%s: warm-up resharded %d pulls from other layouts in %.1f s", spec.name,
                     pulls, time.perf_counter() - started)
    if spec.role in ("prefill", "colocated"):
        started = time.perf_counter()
        budget = measure_prefill_budget(runner, cfg)
        log.info("%s: prefill token budget %d (TTFT SLO %.3g s), timed in %.1f s", spec.name,
                 budget, cfg.ttft_slo, time.perf_counter() - started)
        limits_p = BatchLimits(cfg.context_max_batch_size, budget)
    blocks = BlockManager(num_blocks, cfg.block_size, host_blocks,
                          enable_prefix_caching=cfg.enable_prefix_caching)
    from dsjax.tokenizer import model_tokenizer
    tokenizer = model_tokenizer(cfg.tokenizer or model_dir, mc)
    common = (spec.name, runner, blocks, mc.eos_token_ids, kv_link, send, tokenizer)
    share = cfg.decoding_waiting_share
    if spec.role == "prefill":
        return PrefillWorker(*common, limits=limits_p)
    overlap = cfg.async_scheduling
    if spec.role == "decode":
        return DecodeWorker(*common, limits=limits_d, waiting_share=share,
                            async_scheduling=overlap, pull_timeout_s=cfg.kv_pull_timeout_s)
    if spec.role == "colocated":
        return ColocatedWorker(*common, prefill_limits=limits_p, decode_limits=limits_d,
                               waiting_share=share, async_scheduling=overlap)
    return ChunkedWorker(*common, limits=limits_d, waiting_share=share)


def _serve(plan, build: Callable, send, inbox, transfer_address=None) -> None:
    """Build the worker, say ready (or why not), then run its loop until Shutdown."""
    try:
        worker = build()
    except BaseException as e:  # noqa: BLE001 - report it to the engine instead of dying mute
        log.exception("instance %s could not start", plan.name)
        send(InstanceFailed(plan.name, f"could not start: {type(e).__name__}: {e}"))
        return
    send(InstanceReady(plan.name, plan.role, worker.blocks.num_total, worker.blocks.block_size,
                       transfer_address, worker.stats()))
    worker.run(inbox)


class ThreadHost(InstanceHost):
    """An instance as a thread of this process, on its own slice of this process's devices.
    It speaks by calling the host (a delivery callback); it cannot go silent alone, so it has
    no heartbeat. `kill` abandons it: its later messages are dropped and it exits at its next
    loop turn."""

    backend = "uni"

    def __init__(self, plan, config, model_config, model_dir, devices, deliver, pull_sources):
        super().__init__(plan, deliver)
        self.inbox: queue.Queue = queue.Queue()
        self.worker = None
        self._build = (config, model_config, model_dir, devices, pull_sources)
        self._thread = threading.Thread(target=self._main, name=f"dsjax-{plan.name}",
                                        daemon=True)

    @classmethod
    def launch(cls, config, model_config, model_dir, devices, deliver):
        import jax

        from dsjax.executor.kv_migration import SourceLayout
        configure_jax(config)
        default = devices is None
        devices = list(jax.devices() if default else devices)
        plans = plan_placement(config.mode, len(devices), allow_shared_device=default,
                               **config.placement_kwargs())
        config = with_cpu_kv_budget(config, plans)
        # A pull's shards stay on its source's devices until resharded (LocalKVLink).
        sources = [SourceLayout(p.tp, p.pp, tuple(devices[i] for i in p.device_ids))
                   for p in plans if p.role == "prefill"]
        return [cls(plan, config, model_config, model_dir, devices, deliver, sources)
                for plan in plans]

    def _main(self) -> None:
        from dsjax.executor.kv_migration import LocalKVLink
        config, model_config, model_dir, devices, sources = self._build

        def build():
            self.worker = build_worker(self.plan, config, model_config, model_dir, devices,
                                       self._on_message, LocalKVLink(), pull_sources=sources)
            return self.worker
        try:
            _serve(self.plan, build, self._on_message, self.inbox)
        except BaseException as e:  # noqa: BLE001 - the thread ends: so does the instance
            log.exception("instance %s: its thread raised", self.name)
            self._end(f"its thread raised {type(e).__name__}: {e}")
        else:
            self._end("its worker loop ended")   # after Shutdown or its own report: nothing

    def _launch(self) -> None:
        self._thread.start()

    def _post(self, message) -> None:
        self.inbox.put(message)

    def _wait_stopped(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _terminate(self) -> None:
        if self._thread.is_alive():    # a thread cannot be killed: tell it to leave
            self.inbox.put(Shutdown())


def setup_process(name: str, env: dict, config) -> None:
    """Process-wide settings of a process that runs an instance or one of its stages (an "mp"
    child, a Ray actor): the environment child_environment chose, JAX's config, logging."""
    os.environ.update(env)
    import jax
    # The interpreter may have imported JAX (the parent's main module) before this ran: its
    # platform choice must be set through the config, not the environment.
    if "JAX_PLATFORMS" in env:
        jax.config.update("jax_platforms", env["JAX_PLATFORMS"])
    precision = env.get("DSJAX_MATMUL_PRECISION")
    if precision:
        jax.config.update("jax_default_matmul_precision", precision)
    if env.get("DSJAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", env["DSJAX_COMPILATION_CACHE_DIR"])
    configure_jax(config)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    logging.getLogger("dsjax").setLevel(logging.INFO)


def serve_in_process(plan, config, model_config, model_dir, inbox, send, transfer_host: str,
                     place_stages=None, pull_sources=None) -> None:
    """Body of an instance's own process: a transfer server bound to `transfer_host` for its
    KV, the worker on every device the process sees, its loop until Shutdown (`place_stages`,
    `pull_sources`: as build_worker takes them)."""
    import jax

    from dsjax.engine.startup_heap import freeze_startup_heap
    from dsjax.executor.remote_kv import TransferServerKVLink
    link = TransferServerKVLink(transfer_host)
    log.info("%s: KV transfer server at %s", plan.name, link.address)
    def build():
        worker = build_worker(plan, config, model_config, model_dir, jax.devices(), send, link,
                              place_stages, pull_sources)
        log.info("%s: start-up heap frozen in %.2f s", plan.name, freeze_startup_heap())
        return worker
    _serve(plan, build, send, inbox, link.address)


class _PipeSender:
    """The child's end of its channel to the host: one writer at a time (the worker loop and
    the heartbeat both send)."""

    def __init__(self, conn):
        self._conn, self._lock = conn, threading.Lock()

    def __call__(self, message) -> None:
        with self._lock:
            self._conn.send(message)


def _process_main(plan, config, model_config, model_dir, env, cores, inbox, conn) -> None:
    """Entry point of an "mp" instance process: its own JAX runtime on its own devices."""
    send = _PipeSender(conn)
    # The engine's process is gone once its end of the pipe is: nobody can use this one.
    start_heartbeat(send, on_broken=lambda: os._exit(1))
    if cores:
        os.sched_setaffinity(0, cores)
    setup_process(plan.name, env, config)
    serve_in_process(plan, config, model_config, model_dir, inbox, send,
                     config.kv_transfer_host)


def cpu_core_sets(num_instances: int) -> list[set[int] | None]:
    """Disjoint sets of this process's allowed cores, one per instance (None when there are
    fewer cores than instances: they then share)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < num_instances:
        return [None] * num_instances
    per = len(cores) // num_instances
    return [set(cores[i * per:(i + 1) * per]) for i in range(num_instances)]


class ProcessHost(RemoteHost):
    """An instance as an OS process (spawned, so it starts its own JAX runtime). Its messages
    come over a pipe whose only writer is the child: the child's death is EOF at once."""

    backend = "mp"

    def __init__(self, plan, config, model_config, model_dir, platform: str, device_ids,
                 cores, deliver):
        super().__init__(plan, deliver, config.instance_heartbeat_timeout)
        ctx = multiprocessing.get_context("spawn")
        self.inbox = ctx.Queue()
        self._conn, child_conn = ctx.Pipe(duplex=False)
        env = child_environment(platform, device_ids, plan.num_devices)
        local = dataclasses.replace(plan, device_ids=tuple(range(plan.num_devices)))
        self.process = ctx.Process(target=_process_main, name=f"dsjax-{plan.name}", daemon=True,
                                   args=(local, config, model_config, model_dir, env, cores,
                                         self.inbox, child_conn))
        self._child_conn = child_conn

    @classmethod
    def launch(cls, config, model_config, model_dir, devices, deliver):
        platform, count = accelerator_count()
        plans = plan_placement(config.mode, count or devices_needed(config),
                               **config.placement_kwargs())
        cores = cpu_core_sets(len(plans)) if platform == "cpu" else [None] * len(plans)
        config = with_cpu_kv_budget(config, plans)
        return [cls(plan, config, model_config, model_dir, platform, plan.device_ids, core_set,
                    deliver) for plan, core_set in zip(plans, cores)]

    def _launch(self) -> None:
        self.process.start()
        self._child_conn.close()     # else this process would hold the pipe open: no EOF

    def _receive(self, timeout: float) -> list | None:
        try:
            if not self._conn.poll(timeout):
                return None
            return [self._conn.recv()]
        except EOFError:
            self.process.join(STOP_TIMEOUT_S)
            raise HostEnded(f"instance process exited (code {self.process.exitcode})") from None

    def _post(self, message) -> None:
        try:
            self.inbox.put(message)
        except (ValueError, OSError):   # the queue closed with a dead process
            pass

    def _terminate(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        if self.process.pid is not None:
            self.process.join(STOP_TIMEOUT_S)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process.is_alive() else []


def child_environment(platform: str, device_ids, num_devices: int) -> dict:
    """Environment of an instance process: which devices it may see (device_ids None: a
    scheduler such as Ray sets CUDA_VISIBLE_DEVICES itself), and the parent's JAX settings
    that must carry over (tests ask for float32-exact matmuls and their own compilation
    cache)."""
    env = {}
    if platform == "cpu":
        flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    elif device_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in device_ids)
    if "jax" in sys.modules:
        jax_config = sys.modules["jax"].config
        if jax_config.jax_default_matmul_precision:
            env["DSJAX_MATMUL_PRECISION"] = str(jax_config.jax_default_matmul_precision)
        if jax_config.jax_compilation_cache_dir:
            env["DSJAX_COMPILATION_CACHE_DIR"] = str(jax_config.jax_compilation_cache_dir)
    return env


def accelerator_count() -> tuple[str, int]:
    """(platform, device count) for process hosts, without starting JAX in this process (it
    would claim every GPU's memory): NVIDIA GPUs from the driver, else CPU."""
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        return "cpu", 0
    gpus = "/proc/driver/nvidia/gpus"
    if os.path.isdir(gpus) and os.listdir(gpus):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = len(visible.split(",")) if visible else len(os.listdir(gpus))
        return "gpu", count
    return "cpu", 0
