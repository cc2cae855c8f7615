"""Save and restore the Flax param tree with orbax-checkpoint.

Layout of a checkpoint directory:
    params/       orbax PyTree checkpoint of the param tree
    config.json   the model's config in Hugging Face form (with its model_type), so
                  dsjax.models.registry.config_from_dir reads it back for any family
Restoring targets the caller's shardings, so each device reads its own shards and a sharded
restore never gathers the model on one host.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PARAMS_SUBDIR = "params"


def is_orbax_checkpoint(path: str | Path) -> bool:
    return (Path(path) / PARAMS_SUBDIR).is_dir()


def save_params(params, path: str | Path, config=None) -> Path:
    """Write params (and config.json when config is given) under `path`; returns the directory."""
    path = Path(path).resolve()  # orbax wants absolute paths
    if is_orbax_checkpoint(path):
        raise FileExistsError(f"{path / PARAMS_SUBDIR} already exists: pass a new directory")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_SUBDIR, params)
        ckptr.wait_until_finished()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    return path


def restore_params(path: str | Path, config, dtype=jnp.float32, shardings=None):
    """Params of `config` from an orbax checkpoint, cast to dtype, on `shardings` (pytree like
    config.abstract_params()) or the default device."""
    from dsjax.models.weights import as_numpy_dtype

    path = Path(path).resolve()
    if not is_orbax_checkpoint(path):
        raise FileNotFoundError(f"{path / PARAMS_SUBDIR} not found: not an orbax checkpoint "
                                f"written by dsjax.models.checkpoint.save_params")
    abstract = config.abstract_params(as_numpy_dtype(dtype))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / PARAMS_SUBDIR, target)
