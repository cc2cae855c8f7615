"""A stage's unrolled decode params with every vector in one array.

A jitted call's host work on a CPU grows with its array arguments (XLA's argument checks and
buffer bookkeeping, per array), and an unrolled decode step takes each layer's params as arrays
of their own: 16 a layer for OPT, 212 arguments in all for opt-125m, whose call took 0.56-0.66
ms of the decode thread's CPU a step on the 2-vCPU VM. Ten of a layer's 16 are vectors
(biases, norm scales), a few KiB each. Packed end to end into one array, which the step
slices again (static slices, which XLA fuses into their consumers), they cost one argument:
91 in all, about 1-1.5 us of CPU saved per argument removed (docs/benchmarks.md, run 12).
Matrices stay arrays of their own: XLA's CPU matmuls need contiguous operands, and a slice of
a packed matrix would be copied every step.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class PackedVectors:
    """Params (nested dicts) with their vectors of one dtype moved into `vector`; `layout`:
    ((path, shape, offset), ...) of each, static (part of the program's signature)."""

    def __init__(self, rest: dict, vector: jax.Array, layout: tuple):
        self.rest, self.vector, self.layout = rest, vector, layout

    def tree_flatten(self):
        return (self.rest, self.vector), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(*children, layout)

    def unpack(self) -> dict:
        """The params as the model takes them (inside a jitted step: static slices)."""
        out = _copy_dicts(self.rest)
        for path, shape, offset in self.layout:
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = self.vector[offset:offset + math.prod(shape)].reshape(shape)
        return out


def pack_vectors(params: dict, sharding) -> PackedVectors:
    """`params` with every leaf of at most one dimension, of the first such leaf's dtype,
    packed into one array placed on `sharding` (replicated: the vectors of a tensor-parallel
    layer are sharded, their concatenation is not)."""
    vectors = [(path, leaf) for path, leaf in _leaves(params) if leaf.ndim <= 1]
    if not vectors:
        return PackedVectors(params, jnp.zeros(0), ())
    dtype = vectors[0][1].dtype
    vectors = [(path, leaf) for path, leaf in vectors if leaf.dtype == dtype]
    layout, offset = [], 0
    for path, leaf in vectors:
        layout.append((path, tuple(leaf.shape), offset))
        offset += leaf.size
    vector = jax.device_put(jnp.concatenate(
        [jax.device_put(leaf, sharding).reshape(-1) for _, leaf in vectors]), sharding)
    packed = {path for path, _ in vectors}
    return PackedVectors(_without(params, packed), vector, tuple(layout))


def unpacked(params):
    """The params a model takes, from PackedVectors or as they are."""
    return params.unpack() if isinstance(params, PackedVectors) else params


def _leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _without(tree: dict, paths: set, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            out[key] = _without(value, paths, path)
        elif path not in paths:
            out[key] = value
    return out


def _copy_dicts(tree: dict) -> dict:
    return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}
