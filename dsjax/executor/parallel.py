"""Placement of instances on devices, their meshes, and Megatron-style OPT sharding.

An instance with tensor degree tp and pipeline degree pp owns tp*pp devices: stage s is a
one-axis mesh ("tp") over devices[s*tp:(s+1)*tp] holding layers layer_ranges(L, pp)[s].
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.models.config import OPTConfig

TP_AXIS = "tp"
PP_AXIS = "pp"
# The KV cache [layers, pages, page_size, heads, head_dim] is split by heads.
KV_SPEC = P(None, None, None, TP_AXIS, None)


@dataclasses.dataclass(frozen=True)
class InstancePlan:
    """Where an instance goes, in plain data (it crosses process boundaries): its role and
    degrees, and the indices of its devices among those its host process sees."""
    role: str                # "prefill" | "decode" | "colocated" | "chunked"
    index: int               # among the instances of its role
    tp: int
    pp: int
    device_ids: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}"

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """An InstancePlan bound to device objects in the process that runs the instance."""
    role: str
    index: int
    tp: int
    pp: int
    devices: tuple

    @classmethod
    def bind(cls, plan: InstancePlan, devices) -> "InstanceSpec":
        devices = list(devices)
        if max(plan.device_ids) >= len(devices):
            raise ValueError(f"{plan.name} needs device ids {plan.device_ids} but this process "
                             f"sees {len(devices)} devices")
        return cls(plan.role, plan.index, plan.tp, plan.pp,
                   tuple(devices[i] for i in plan.device_ids))

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}"

    def stage_devices(self, stage: int) -> tuple:
        return self.devices[stage * self.tp:(stage + 1) * self.tp]


def placement_groups(mode: str, *, context_tensor_parallel_size: int = 1,
                     context_pipeline_parallel_size: int = 1,
                     decoding_tensor_parallel_size: int = 1,
                     decoding_pipeline_parallel_size: int = 1,
                     num_prefill_instances: int = 1, num_decode_instances: int = 1
                     ) -> list[tuple[str, int, int, int]]:
    """(role, instances, tp, pp) per role. Colocated and chunked modes run one instance with
    the context (prefill) parallelism."""
    for name, v in [("context_tensor_parallel_size", context_tensor_parallel_size),
                    ("context_pipeline_parallel_size", context_pipeline_parallel_size),
                    ("decoding_tensor_parallel_size", decoding_tensor_parallel_size),
                    ("decoding_pipeline_parallel_size", decoding_pipeline_parallel_size),
                    ("num_prefill_instances", num_prefill_instances),
                    ("num_decode_instances", num_decode_instances)]:
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if mode in ("colocated", "chunked"):
        return [(mode, 1, context_tensor_parallel_size, context_pipeline_parallel_size)]
    if mode == "disaggregated":
        return [("prefill", num_prefill_instances, context_tensor_parallel_size,
                 context_pipeline_parallel_size),
                ("decode", num_decode_instances, decoding_tensor_parallel_size,
                 decoding_pipeline_parallel_size)]
    raise ValueError(f"mode must be disaggregated, colocated or chunked, got {mode!r}")


def plan_placement(mode: str, num_devices: int, *, allow_shared_device: bool = False,
                   **sizes) -> list[InstancePlan]:
    """Assign device indices 0..num_devices-1 in order: prefill instances first, then decode
    instances, disjointly.

    `allow_shared_device` lets a default placement run both phases on a single device when
    that is all there is (the engine then still schedules them as separate instances).
    """
    groups = placement_groups(mode, **sizes)
    needed = sum(n * tp * pp for _, n, tp, pp in groups)
    if needed > num_devices:
        if allow_shared_device and num_devices == 1 and all(tp * pp == 1 for _, _, tp, pp in groups):
            return [InstancePlan(role, i, 1, 1, (0,)) for role, n, _, _ in groups for i in range(n)]
        layout = " + ".join(f"{n} {role} x (tp {tp} * pp {pp})" for role, n, tp, pp in groups)
        raise ValueError(f"placement needs {needed} devices ({layout}) but only {num_devices} "
                         f"are available: lower the parallel sizes or the instance counts")
    plans, at = [], 0
    for role, n, tp, pp in groups:
        for i in range(n):
            plans.append(InstancePlan(role, i, tp, pp, tuple(range(at, at + tp * pp))))
            at += tp * pp
    return plans


def single_instance_spec(role: str, devices, tp: int = 1, pp: int = 1) -> InstanceSpec:
    """One instance on the first tp*pp of `devices` (profiler, benchmarks)."""
    plan = plan_placement("colocated", len(devices), context_tensor_parallel_size=tp,
                          context_pipeline_parallel_size=pp)[0]
    return InstanceSpec.bind(dataclasses.replace(plan, role=role), devices)


def stage_mesh(devices) -> Mesh:
    return Mesh(np.array(devices), (TP_AXIS,))


def layer_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Split layers into pp contiguous stages, earlier stages one layer larger when uneven."""
    if pp > num_layers:
        raise ValueError(f"pipeline degree {pp} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for s in range(pp):
        end = start + base + (1 if s < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def check_tensor_parallel(config: OPTConfig, tp: int) -> None:
    for what, n in [("num_attention_heads", config.num_attention_heads), ("ffn_dim", config.ffn_dim)]:
        if n % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {config.name}'s {what} "
                             f"({n}): choose a divisor")


_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "fc1")
_ROW_PARALLEL = ("out_proj", "fc2")


def param_spec(path: tuple[str, ...]) -> P:
    """Megatron sharding: Q/K/V and fc1 split by output columns (with their biases), out_proj and
    fc2 by input rows (their biases replicated, added once after the reduction). The rest
    (embeddings, layer norms) is replicated."""
    if len(path) >= 3 and path[0] == "layers":
        layer, leaf = path[1], path[-1]
        if layer in _COLUMN_PARALLEL:
            return P(None, None, TP_AXIS) if leaf == "kernel" else P(None, TP_AXIS)
        if layer in _ROW_PARALLEL and leaf == "kernel":
            return P(None, TP_AXIS, None)
    return P()


def param_shardings(params_shape, mesh: Mesh):
    """A pytree of NamedShardings matching params_shape (a tree of arrays or ShapeDtypeStructs)."""
    def one(path, _):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        return NamedSharding(mesh, param_spec(keys))
    return jax.tree_util.tree_map_with_path(one, params_shape)


def stage_param_tree(params: dict, layer_range: tuple[int, int], first: bool, last: bool,
                     config: OPTConfig, take_layers=None) -> dict:
    """The part of the full param tree one pipeline stage needs (tied embedding on both ends).
    take_layers(leaf) extracts the stage's layers from a stacked leaf (default: slicing)."""
    start, end = layer_range
    take_layers = take_layers or (lambda x: x[start:end])
    out = {"layers": jax.tree_util.tree_map(take_layers, params["layers"])}
    if first or last:
        out["embed_tokens"] = params["embed_tokens"]
    if first:
        out["embed_positions"] = params["embed_positions"]
        if config.has_projections:
            out["project_in"] = params["project_in"]
    if last:
        if config.has_final_layer_norm:
            out["final_layer_norm"] = params["final_layer_norm"]
        if config.has_projections:
            out["project_out"] = params["project_out"]
    return out


def instance_mesh(spec: InstanceSpec) -> Mesh:
    """All of an instance's devices: stage s is row s."""
    return Mesh(np.array(spec.devices).reshape(spec.pp, spec.tp), (PP_AXIS, TP_AXIS))


def pipeline_param_shardings(params_shape, mesh: Mesh):
    """Shardings over an instance mesh that put each stage's layers on that stage's devices
    (stacked layer axis split over "pp") and the rest as param_spec says, on every stage."""
    def one(path, leaf):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        spec = tuple(param_spec(keys)) + (None,) * (len(leaf.shape) - len(param_spec(keys)))
        if keys[0] == "layers":
            spec = (PP_AXIS,) + spec[1:]
        return NamedSharding(mesh, P(*spec))
    return jax.tree_util.tree_map_with_path(one, params_shape)


def stage_view(array: jax.Array, stage_mesh: Mesh, spec: P, shape) -> jax.Array:
    """The shards of `array` that live on a stage's devices, as that stage's array (no copy)."""
    by_device = {shard.device: shard.data for shard in array.addressable_shards}
    sharding = NamedSharding(stage_mesh, spec)
    pieces = [by_device[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)
