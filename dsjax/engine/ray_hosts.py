"""The "ray" executor backend: every instance a Ray actor, on any node of a cluster.

Each instance gets a placement group: one bundle for the whole instance (STRICT_PACK: its
devices on one node), or with `ray_stage_actors` (or a plan's `stage_nodes`) one bundle per
pipeline stage (PACK: each stage's TP group on one node, stages on as few nodes as fit); a
plan's node assignments pin bundles to nodes (`node:<ip>` resources). A bundle asks for GPUs
where the cluster has them, else for `num_cpus` (on CPU an actor's devices are XLA host
devices). The instance's actor runs the same process body as an "mp" child
(`serve_in_process`); its later stages, if any, are stage actors it starts in its own bundles
(dsjax.executor.stage_group), so they die with it.

Messages ride Ray calls: `deliver` (router -> actor, numbered because a threaded actor may run
calls out of order) and `take` (a long poll, actor -> router). KV and activations never enter
Ray's object store: they wait on each actor's JAX transfer servers, bound to the address of the
actor's node, and the messages carry only their transfer ids.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import queue
import threading

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                            PlacementGroupSchedulingStrategy)

from dsjax.engine.instance_hosts import (child_environment, params_loader, resolve_dtype,
                                         serve_in_process, setup_process, with_cpu_kv_budget)
from dsjax.engine.startup_heap import freeze_startup_heap
from dsjax.executor.hosts import (POLL_S, STOP_TIMEOUT_S, HostEnded, RemoteHost,
                                  devices_needed)
from dsjax.executor.kv_cache import available_memory_bytes, cpu_kv_bytes_across_nodes
from dsjax.executor.kv_migration import SourceLayout
from dsjax.executor.parallel import plan_placement

# How long an instance may wait for its bundles before it fails as unplaceable.
PLACEMENT_TIMEOUT_S = 300.0
# How long the nodes may take to report their free memory (a task each) at launch.
NODE_MEMORY_TIMEOUT_S = 120.0


def connect_cluster(config, devices_needed: int) -> str:
    """Join `config.ray_address`, or start a local cluster (unless this process already did);
    returns the platform instances run on: "gpu" where the cluster has GPUs, else "cpu"."""
    if not ray.is_initialized():
        if config.ray_address:
            ray.init(address=config.ray_address)
        else:
            # On CPU every device is a logical CPU: count enough of them for the placement.
            ray.init(num_cpus=max(os.cpu_count() or 1, devices_needed),
                     include_dashboard=False)
    return "gpu" if ray.cluster_resources().get("GPU", 0) else "cpu"


def bundle(platform: str, num_devices: int, node: str | None) -> dict:
    """The resources of one actor's devices, pinned to `node` (its IP) when given."""
    resources = {"GPU" if platform == "gpu" else "CPU": num_devices}
    if node:
        resources[f"node:{node}"] = 0.001
    return resources


def actor_options(platform: str, num_devices: int, pg, index: int, env: dict) -> dict:
    """Ray options of an actor that owns bundle `index` of `pg` and its devices."""
    devices = dict(num_gpus=num_devices, num_cpus=0) if platform == "gpu" \
        else dict(num_cpus=num_devices)
    return dict(devices, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, index))


@dataclasses.dataclass(frozen=True)
class StageGroup:
    """What an instance's actor needs to start its later stages in its own bundles."""
    pg: object
    platform: str
    env: dict


@ray.remote
class StageActor:
    """One later pipeline stage of an instance (a StageServer) in its own process."""

    def __init__(self, plan, index, config, model_config, model_dir, num_pages, num_slots, env):
        setup_process(f"{plan.name}.stage{index}", env, config)
        import jax
        import jax.numpy as jnp

        from dsjax.executor.kernels import get_attention_backend
        from dsjax.executor.stage_group import StageServer, TransferChannel, build_stage
        devices = jax.devices()
        dtype = jnp.dtype(resolve_dtype(config.dtype, devices))
        stage = build_stage(model_config, devices, index, plan.pp,
                            params_loader(config, model_config, model_dir, dtype), dtype=dtype,
                            num_pages=num_pages, page_size=config.block_size,
                            attention=get_attention_backend(config.attention_backend),
                            num_slots=num_slots)
        self.server = StageServer(stage, TransferChannel(ray.util.get_node_ip_address()))
        # Its programs compile later, as the head warms up; the params and modules are frozen.
        freeze_startup_heap()

    def call(self, method: str, *args):
        return getattr(self.server, method)(*args)

    def pid(self) -> int:
        return os.getpid()


class StageLost(RuntimeError):
    """A stage actor died: its instance has lost that stage's layers and pages."""


class ActorRPC:
    """A StageServer behind a Ray actor, called like a local one (blocking, in order)."""

    def __init__(self, actor, label: str):
        self.actor, self.label = actor, label

    def __getattr__(self, method):
        def call(*args):
            try:
                return ray.get(self.actor.call.remote(method, *args))
            except RayActorError as e:
                raise StageLost(f"{self.label} died: {_first_line(e)}") from None
        return call


def start_stage_actors(plan, config, model_config, model_dir, group: StageGroup,
                       num_pages: int, num_slots: int) -> list:
    """Stage actors 1..pp-1 of `plan` in bundles 1..pp-1, ready (or failed) on return."""
    actors = [StageActor.options(**actor_options(group.platform, plan.tp, group.pg, s,
                                                 group.env)).remote(
        plan, s, config, model_config, model_dir, num_pages, num_slots, group.env)
        for s in range(1, plan.pp)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    return actors


@ray.remote
class InstanceActor:
    """One instance: its worker loop on a thread, fed by `deliver`, read by `take`."""

    def __init__(self, plan, config, model_config, model_dir, env, stages: StageGroup | None,
                 pull_sources=None):
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._early: dict[int, object] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stage_actors: list = []
        self._thread = threading.Thread(
            target=self._main, daemon=True,
            args=(plan, config, model_config, model_dir, env, stages, pull_sources))
        self._thread.start()

    def _main(self, plan, config, model_config, model_dir, env, stages, pull_sources) -> None:
        setup_process(plan.name, env, config)
        host = ray.util.get_node_ip_address()
        place = None
        if stages is not None:
            from dsjax.executor.stage_group import TransferChannel, stage_placer

            def servers(runner):
                self._stage_actors.extend(start_stage_actors(
                    plan, config, model_config, model_dir, stages, runner.num_pages,
                    runner.max_sampled_rows))
                return [ActorRPC(a, f"the actor of its stage {s}")
                        for s, a in enumerate(self._stage_actors, start=1)]
            place = stage_placer(servers, TransferChannel(host))
        try:
            serve_in_process(plan, config, model_config, model_dir, self._inbox,
                             self._outbox.put, host, place, pull_sources)
        finally:
            # Let the stage actors exit on their own before this actor is killed (which would
            # kill them mid-call).
            ray.wait([a.__ray_terminate__.remote() for a in self._stage_actors],
                     num_returns=len(self._stage_actors), timeout=STOP_TIMEOUT_S)

    def deliver(self, seq: int, message) -> None:
        with self._lock:
            self._early[seq] = message
            while self._next in self._early:
                self._inbox.put(self._early.pop(self._next))
                self._next += 1

    def take(self, timeout: float) -> tuple[list, bool]:
        """(messages for the router, whether the worker loop still runs)."""
        msgs = []
        try:
            msgs.append(self._outbox.get(timeout=timeout))
            while True:
                msgs.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        return msgs, self._thread.is_alive() or not self._outbox.empty()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def pids(self) -> list[int]:
        """This actor's process id, then its stage actors'."""
        return [os.getpid(), *ray.get([a.pid.remote() for a in self._stage_actors])]


def resolve_node(label: str | None, alive: list[str]) -> str | None:
    """A plan's node name as an address: "#k" (what the placement search writes) is the k-th
    of the cluster's alive nodes in address order; anything else is an address already."""
    if label is None or not label.startswith("#"):
        return label
    k = int(label[1:])
    if k >= len(alive):
        raise ValueError(f"the plan puts an instance on node {label}, but the Ray cluster has "
                         f"{len(alive)} alive node(s): add nodes or search for fewer")
    return sorted(alive)[k]


def actor_nodes(config, plan, split: bool) -> tuple[str | None, ...]:
    """The node each of the instance's actors is pinned to (None: wherever Ray places it)."""
    where = config.nodes_for(plan.role, plan.index)
    if where is not None and where.stage_nodes:
        nodes = where.stage_nodes if split else where.stage_nodes[:1]
    else:
        nodes = (where.node if where else None,) * (plan.pp if split else 1)
    if not any(n and n.startswith("#") for n in nodes):
        return nodes
    alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    return tuple(resolve_node(n, alive) for n in nodes)


def actor_layout(config, plan) -> tuple[bool, int]:
    """(whether the instance's pipeline stages are actors of their own, the devices of each
    of its actors)."""
    where = config.nodes_for(plan.role, plan.index)
    split = plan.pp > 1 and (config.ray_stage_actors or bool(where and where.stage_nodes))
    return split, plan.tp if split else plan.num_devices


def node_memory() -> dict[str, tuple[int, int]]:
    """Each alive node with CPUs: its address -> (its logical CPUs, the memory available on
    it, read there by a task pinned to it)."""
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    read = ray.remote(num_cpus=0)(available_memory_bytes)
    refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in alive]
    try:
        available = ray.get(refs, timeout=NODE_MEMORY_TIMEOUT_S)
    except (GetTimeoutError, RayError) as e:   # slow, or a node died meanwhile
        for ref in refs:
            ray.cancel(ref, force=True)
        raise RuntimeError(f"the Ray cluster's nodes did not report their free memory (to "
                           f"size the KV cache): {_first_line(e)}; set cpu_kv_cache_bytes "
                           f"(--cpu-kv-cache-bytes)") from None
    return {n["NodeManagerAddress"]: (int(n["Resources"]["CPU"]), int(a))
            for n, a in zip(alive, available)}


def cluster_cpu_kv_bytes(config, plans, total_devices: int) -> int:
    """The engine's KV budget per CPU device from the memory of the nodes it runs on, not
    the driver's (kv_cache.cpu_kv_bytes_across_nodes): the nodes its plans pin every actor
    to, else every node it may land on."""
    layouts = [(plan, *actor_layout(config, plan)) for plan in plans]
    pinned: dict[str, int] = {}
    for plan, split, per_actor in layouts:
        nodes = actor_nodes(config, plan, split)
        if None in nodes:   # Ray places this actor: any node may host it
            pinned = {}
            break
        for node in nodes:
            pinned[node] = pinned.get(node, 0) + per_actor
    return cpu_kv_bytes_across_nodes(node_memory(), total_devices, pinned,
                                     min(per_actor for _, _, per_actor in layouts))


class RayHost(RemoteHost):
    """An instance as a Ray actor (and stage actors). Each `take` that returns, even empty, is
    a sign of life; one that hangs past the heartbeat time-out (a frozen actor, a node cut
    off) ends the instance."""

    backend = "ray"

    def __init__(self, plan, config, model_config, model_dir, platform: str, deliver,
                 pull_sources=None):
        super().__init__(plan, deliver, config.instance_heartbeat_timeout)
        split, self._per_actor = actor_layout(config, plan)
        self._split, self._platform = split, platform
        self._args = (config, model_config, model_dir)
        self._pull_sources = pull_sources
        self.bundles = [bundle(platform, self._per_actor, n)
                        for n in actor_nodes(config, plan, split)]
        self.pg = self.actor = None
        self._seq = itertools.count()
        self._pending = None           # the outstanding `take`
        self._loop_ended = False
        self._terminated = threading.Lock()

    @classmethod
    def launch(cls, config, model_config, model_dir, devices, deliver):
        needed = devices_needed(config)
        platform = connect_cluster(config, needed)
        plans = plan_placement(config.mode, needed, **config.placement_kwargs())
        # The KV budget from the nodes' free memory where it sizes the cache (a CPU cluster,
        # no fixed page count); otherwise it is unused, and the driver's does.
        nodes_size_it = platform == "cpu" and not config.num_blocks
        config = with_cpu_kv_budget(config, plans, functools.partial(
            cluster_cpu_kv_bytes, config, plans) if nodes_size_it else None)
        # What a decode actor's warm-up reshards: each prefill instance's shards as they
        # arrive, those of its stage actors with every head joined.
        sources = [SourceLayout(p.tp, p.pp, joined_stages=actor_layout(config, p)[0])
                   for p in plans if p.role == "prefill"]
        return [cls(plan, config, model_config, model_dir, platform, deliver, sources)
                for plan in plans]

    def _launch(self) -> None:
        self.pg = placement_group(self.bundles,
                                  strategy="PACK" if self._split else "STRICT_PACK")
        env = child_environment(self._platform, None, self._per_actor)
        local = dataclasses.replace(self.plan, device_ids=tuple(range(self._per_actor)))
        stages = StageGroup(self.pg, self._platform, env) if self._split else None
        self.actor = InstanceActor.options(
            max_concurrency=4,
            **actor_options(self._platform, self._per_actor, self.pg, 0, env)).remote(
            local, *self._args, env, stages, self._pull_sources)

    def _connect(self) -> None:
        """Wait for the bundles: an unplaceable instance fails with what it asked for."""
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            raise HostEnded(f"cannot place its actors: needs {self.bundles}, the cluster has "
                            f"{ray.available_resources()} free") from None
        except RayError as e:   # removed while waiting (stop), or the cluster went away
            raise HostEnded(f"its placement group failed: {_first_line(e)}") from None

    def _receive(self, timeout: float) -> list | None:
        if self._loop_ended:
            raise HostEnded("its worker loop ended")
        if self._pending is None:
            self._pending = self.actor.take.remote(POLL_S)
        ready, _ = ray.wait([self._pending], timeout=timeout)
        if not ready:
            return None
        ref, self._pending = self._pending, None
        try:
            messages, running = ray.get(ref)
        except RayActorError as e:
            raise HostEnded(f"its Ray actor died: {_first_line(e)}") from None
        self._loop_ended = not running
        return messages

    def _post(self, message) -> None:
        self.actor.deliver.remote(next(self._seq), message)

    def pids(self) -> list[int]:
        """The instance's processes: its actor's, then its stage actors'."""
        return ray.get(self.actor.pids.remote())

    def _wait_stopped(self, timeout: float) -> None:
        if self.actor is not None:
            try:   # the worker loop ends and lets its stage actors go; then the forwarder ends
                ray.get(self.actor.join.remote(timeout), timeout=2 * timeout)
            except RayError:
                pass
        super()._wait_stopped(timeout)

    def _terminate(self) -> None:
        if self.actor is None or not self._terminated.acquire(blocking=False):
            return
        ray.kill(self.actor)
        remove_placement_group(self.pg)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
