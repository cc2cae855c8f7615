"""Packed decode params: every vector moves into one array, and a step's unpacking gives back
exactly the params it was made from (checked against the NumPy arrays they came from)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.executor.packed_params import PackedVectors, pack_vectors, unpacked


def test_unpacking_gives_back_every_param_and_one_array_holds_the_vectors():
    rng = np.random.default_rng(0)
    source = {
        "embed": {"embedding": rng.standard_normal((10, 4)).astype(np.float32)},
        "layers_0": {"attn": {"q": {"kernel": rng.standard_normal((4, 4)).astype(np.float32),
                                    "bias": rng.standard_normal(4).astype(np.float32)}},
                     "norm": {"scale": rng.standard_normal(4).astype(np.float32),
                              "bias": rng.standard_normal(4).astype(np.float32)}},
        "layers_1": {"norm": {"scale": rng.standard_normal(4).astype(np.float32)},
                     "gate": np.float32(0.5),                     # a scalar is a vector too
                     "steps": np.arange(3, dtype=np.int32)},      # another dtype stays apart
    }
    sharding = NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("tp",)), PartitionSpec())
    packed = pack_vectors(jax.tree_util.tree_map(jnp.asarray, source), sharding)
    assert isinstance(packed, PackedVectors)
    # Arguments a step takes: the 2 matrices, the int vector and the one packed array.
    assert len(jax.tree_util.tree_leaves(packed)) == 4
    assert packed.vector.shape == (4 + 4 + 4 + 4 + 1,)

    def same(got, want):
        got_leaves, got_tree = jax.tree_util.tree_flatten(got)
        want_leaves, want_tree = jax.tree_util.tree_flatten(want)
        assert got_tree == want_tree
        for g, w in zip(got_leaves, want_leaves):
            np.testing.assert_array_equal(np.asarray(g), w)
            assert np.asarray(g).dtype == np.asarray(w).dtype
    same(packed.unpack(), source)
    # Inside a jitted step (the layout is static, the unpacking static slices).
    same(jax.jit(unpacked)(packed), source)
    assert unpacked(source) is source
