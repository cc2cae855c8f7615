"""Placement of instances on devices, their meshes, and Megatron-style sharding of any family
(each family declares which of its projections are column- or row-parallel: models/base.py).

An instance with tensor degree tp and pipeline degree pp owns tp*pp devices: stage s is a
one-axis mesh ("tp") over devices[s*tp:(s+1)*tp] holding layers layer_ranges(L, pp)[s].
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.models.base import TP_AXIS, leaf_keys

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


def param_shardings(config, params_shape, mesh: Mesh):
    """A pytree of NamedShardings matching params_shape (a tree of arrays or ShapeDtypeStructs),
    by the family's tensor-parallel rules for this mesh's degree."""
    tp = mesh.shape[TP_AXIS]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, config.param_spec(leaf_keys(path), tp)),
        params_shape)


def stage_param_tree(params: dict, layer_range: tuple[int, int], first: bool, last: bool,
                     config, take_layers=None) -> dict:
    """The part of the full param tree one pipeline stage needs (a tied embedding on both
    ends). take_layers(leaf) extracts the stage's layers from a stacked leaf (default:
    slicing)."""
    start, end = layer_range
    take_layers = take_layers or (lambda x: x[start:end])
    out = {"layers": jax.tree_util.tree_map(take_layers, params["layers"])}
    out.update({k: params[k] for k in config.stage_keys(first, last) if k in params})
    return out


def instance_mesh(spec: InstanceSpec) -> Mesh:
    """All of an instance's devices: stage s is row s."""
    return Mesh(np.array(spec.devices).reshape(spec.pp, spec.tp), (PP_AXIS, TP_AXIS))


def pipeline_param_shardings(config, params_shape, mesh: Mesh):
    """Shardings over an instance mesh that put each stage's layers on that stage's devices
    (stacked layer axis split over "pp") and the rest as the family's rules say, on every
    stage."""
    tp = mesh.shape[TP_AXIS]

    def one(path, leaf):
        keys = leaf_keys(path)
        base = tuple(config.param_spec(keys, tp))
        spec = base + (None,) * (len(leaf.shape) - len(base))
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
