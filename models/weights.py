"""Model weights into the Flax param tree: from Hugging Face checkpoints, or random ("dummy").

The tree is the family's `abstract_params()`: decoder layers stacked on a leading axis
(nn.scan), Dense kernels [in, out]. Where each leaf comes from is the family's declaration
(`ModelConfig.hf_tensor`: a tensor name, transposed or not, maybe a column range of a fused
tensor). Every leaf is built with `jax.make_array_from_callback`, so each device reads only its
own slice of the files (safetensors' lazy slices) and a sharded load never holds the whole
model on the host.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.models.base import leaf_keys

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LOAD_FORMATS = ("auto", "dummy", "safetensors", "pt", "orbax")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PT_INDEX = "pytorch_model.bin.index.json"
PT_SINGLE = "pytorch_model.bin"


def as_numpy_dtype(dtype) -> np.dtype:
    """'bfloat16' / jnp.bfloat16 / np.dtype -> np.dtype, restricted to what serving supports."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return np.dtype(DTYPES[name])


def _default_shardings(abstract):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract)


# ---------------------------------------------------------------------------------------------
# Reading tensors (slices of them) from checkpoint files


class TensorStore(Protocol):
    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


class SafetensorsStore:
    """safetensors files through the library's lazy slices: reading a slice touches only the
    bytes it needs (bfloat16 arrives as ml_dtypes' numpy bfloat16)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = {f: safe_open(str(f), framework="numpy") for f in files}
        self._where = {name: f for f, h in self._handles.items() for name in h.keys()}

    def names(self):
        return set(self._where)

    def _slice(self, name):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name):
        return tuple(self._slice(name).get_shape())

    def read(self, name, index):
        return self._slice(name)[index]


class TorchStore:
    """pytorch_model*.bin files, memory-mapped by torch.load."""

    def __init__(self, files: list[Path]):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"reading {files[0].name} needs torch: `pip install torch`, or convert the "
                f"checkpoint to safetensors") from e
        self._torch = torch
        self._tensors = {}
        for f in files:
            self._tensors.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))

    def names(self):
        return set(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def read(self, name, index):
        t = self._tensors[name][index]
        # numpy has no bfloat16; widen first (exact), the caller casts to the target dtype.
        return (t.float() if t.dtype == self._torch.bfloat16 else t).numpy()


def find_weight_files(model_dir: str | Path, load_format: str = "auto") -> tuple[str, list[Path]]:
    """The checkpoint files of a Hugging Face model directory -> ("safetensors" | "pt", files)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found: pass an existing "
                                f"Hugging Face model directory")
    candidates = {
        "safetensors": (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "*.safetensors"),
        "pt": (PT_INDEX, PT_SINGLE, "pytorch_model-*.bin"),
    }
    if load_format not in ("auto", *candidates):
        raise ValueError(f"load_format {load_format!r} is not a Hugging Face checkpoint format: "
                         f"use auto, safetensors or pt")
    formats = list(candidates) if load_format == "auto" else [load_format]
    for fmt in formats:
        index, single, pattern = candidates[fmt]
        if (model_dir / index).is_file():
            weight_map = json.loads((model_dir / index).read_text())["weight_map"]
            files = [model_dir / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} in {model_dir} lists missing files: {missing}")
            return fmt, files
        if (model_dir / single).is_file():
            return fmt, [model_dir / single]
        files = sorted(model_dir.glob(pattern))
        if files:
            return fmt, files
    looked_for = [n for fmt in formats for n in candidates[fmt]]
    raise FileNotFoundError(f"no weight files in {model_dir}: looked for {', '.join(looked_for)}")


def open_store(model_dir: str | Path, load_format: str = "auto") -> TensorStore:
    fmt, files = find_weight_files(model_dir, load_format)
    return SafetensorsStore(files) if fmt == "safetensors" else TorchStore(files)


# ---------------------------------------------------------------------------------------------
# Flax leaf <-> checkpoint tensor


def detect_prefix(config, names: set[str]) -> str:
    """Which of the family's checkpoint prefixes this checkpoint uses (found by the first
    stage's token embedding)."""
    embedding = config.hf_tensor(("embed_tokens", "embedding"), None).name
    for prefix in config.HF_PREFIXES:
        if prefix + embedding in names:
            return prefix
    looked = ", ".join(p + embedding for p in config.HF_PREFIXES)
    raise KeyError(f"tensor {embedding} missing from the checkpoint (looked for {looked}): is "
                   f"this a {config.model_type} checkpoint?")


def _leaf_loader(store: TensorStore, prefix: str, keys: tuple[str, ...], aval, config):
    """Check the leaf's checkpoint tensors and return a callback reading any slice of it."""
    stacked = keys[0] == "layers"
    per_tensor_shape = tuple(aval.shape[1:] if stacked else aval.shape)
    specs = ([config.hf_tensor(keys, i) for i in range(config.num_hidden_layers)] if stacked
             else [config.hf_tensor(keys, None)])
    names = [s.name if s.root else prefix + s.name for s in specs]
    spec = specs[0]
    available = store.names()
    for name in names:
        if name not in available:
            raise KeyError(f"tensor {name} missing from the checkpoint: it does not match the "
                           f"config (wrong model directory or config.json?)")
        shape = store.shape(name)
        flax_shape = tuple(shape[::-1]) if spec.transpose else tuple(shape)
        if spec.columns is not None:   # a column range of a fused tensor
            c0, c1 = spec.columns
            ok = flax_shape[:-1] == per_tensor_shape[:-1] and c1 - c0 == per_tensor_shape[-1] \
                and c1 <= flax_shape[-1]
        else:
            ok = flax_shape == per_tensor_shape
        if not ok:
            want = per_tensor_shape[::-1] if spec.transpose else per_tensor_shape
            raise ValueError(f"tensor {name} has shape {list(shape)}, expected "
                             f"{list(want)} for this config")

    def read_one(name, index):
        if spec.columns is not None:
            start, stop, _ = index[-1].indices(per_tensor_shape[-1])
            index = (*index[:-1], slice(spec.columns[0] + start, spec.columns[0] + stop))
        part = store.read(name, index[::-1] if spec.transpose else index)
        return np.asarray(part.T if spec.transpose else part).astype(aval.dtype)

    cache: dict[Any, np.ndarray] = {}  # replicated leaves ask for the same slice per device

    def callback(index):
        index = tuple(index)
        key = tuple(s.indices(d) for s, d in zip(index, aval.shape))
        if key not in cache:
            if stacked:
                layers = range(*index[0].indices(config.num_hidden_layers))
                cache[key] = np.stack([read_one(names[i], index[1:]) for i in layers])
            else:
                cache[key] = read_one(names[0], index)
        return cache[key]

    return callback


def load_hf_params(model_dir: str | Path, config, dtype=jnp.float32, shardings=None,
                   load_format: str = "auto"):
    """Params of `config` from a Hugging Face checkpoint (safetensors or pytorch .bin, single or
    sharded), cast to `dtype`, placed on `shardings` (pytree like abstract_params) or the
    default device. A tied LM head's tensor, if present, is ignored."""
    dtype = as_numpy_dtype(dtype)
    store = open_store(model_dir, load_format)
    prefix = detect_prefix(config, store.names())
    abstract = config.abstract_params(dtype)
    shardings = _default_shardings(abstract) if shardings is None else shardings

    # Check every tensor before reading any, so a bad checkpoint fails in seconds, not after
    # half of a large model has loaded.
    readers = jax.tree_util.tree_map_with_path(
        lambda path, aval: _leaf_loader(store, prefix, leaf_keys(path), aval, config), abstract)
    return jax.tree.map(
        lambda aval, sharding, read: jax.make_array_from_callback(aval.shape, sharding, read,
                                                                  dtype=aval.dtype),
        abstract, shardings, readers)


# ---------------------------------------------------------------------------------------------
# Random weights


def mix32(h):
    """A 32-bit integer hash (lowbias32): full avalanche, so neighbouring indices decorrelate."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _hash_normal(seed, leaf: int, shape, dtype):
    """Standard normal noise from a hash of each element's index (Box-Muller).

    Used instead of jax.random because XLA:CPU takes ~0.3 s to compile each threefry call
    (seconds per model in tests); being elementwise on iotas it is also trivially sharded."""
    h = jnp.full(shape, mix32(seed.astype(jnp.uint32) * jnp.uint32(1000003) + jnp.uint32(leaf)))
    for axis in range(len(shape)):
        salt = jnp.uint32((0x9E3779B9 * (axis + 1)) & 0xFFFFFFFF)
        h = mix32(h ^ (jax.lax.broadcasted_iota(jnp.uint32, shape, axis) + salt))
    u1 = ((h >> 8).astype(jnp.float32) + 0.5) / 2 ** 24  # (0, 1): log stays finite
    u2 = (mix32(h ^ jnp.uint32(0x68E31DA4)) >> 8).astype(jnp.float32) / 2 ** 24
    return (jnp.sqrt(-2 * jnp.log(u1)) * jnp.cos(2 * jnp.pi * u2)).astype(dtype)


def _is_norm(module: str) -> bool:
    return "norm" in module or module.startswith("ln_")


def _dummy_leaf(seed, leaf: int, keys: tuple[str, ...], aval):
    module, name = keys[-2], keys[-1]
    if _is_norm(module):
        return (jnp.ones if name == "scale" else jnp.zeros)(aval.shape, aval.dtype)
    scale = 0.01 if name == "bias" else 0.02
    return (scale * _hash_normal(seed, leaf, aval.shape, jnp.float32)).astype(aval.dtype)


@functools.lru_cache(maxsize=8)
def _dummy_init(config, dtype: np.dtype, shardings_flat, shardings_treedef):
    """Jitted seed -> params, cached so repeated calls (tests, restarts) compile once."""
    abstract = config.abstract_params(dtype)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out_shardings = None if shardings_treedef is None \
        else jax.tree_util.tree_unflatten(shardings_treedef, shardings_flat)

    def init(seed):
        leaves = [_dummy_leaf(seed, i, leaf_keys(path), aval)
                  for i, (path, aval) in enumerate(flat)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return jax.jit(init, out_shardings=out_shardings)


def dummy_params(config, dtype=jnp.float32, seed: int = 0, shardings=None):
    """Random params of the real shapes (normal*0.02 matrices, normal*0.01 biases, unit
    norms), generated on device straight into `shardings`: nothing passes through the host,
    so any size fits where its shards fit."""
    if shardings is None:
        init = _dummy_init(config, as_numpy_dtype(dtype), None, None)
    else:
        flat, treedef = jax.tree_util.tree_flatten(shardings)
        init = _dummy_init(config, as_numpy_dtype(dtype), tuple(flat), treedef)
    return init(jnp.asarray(seed, jnp.uint32))


# ---------------------------------------------------------------------------------------------
# Dispatcher


def detect_load_format(model: str | Path) -> str:
    """'orbax', 'safetensors' or 'pt' for a model directory."""
    from dsjax.models import checkpoint

    if checkpoint.is_orbax_checkpoint(model):
        return "orbax"
    return find_weight_files(model)[0]


def load_params(model: str | Path, config, dtype=jnp.float32, load_format: str = "auto",
                seed: int = 0, shardings=None):
    """Params for the engine. `model` is a model directory (ignored by load_format='dummy')."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}: use one of {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        return dummy_params(config, dtype, seed=seed, shardings=shardings)
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model} not found: pass a directory with "
                                f"weights, or load_format='dummy' for random weights")
    if load_format == "auto":
        load_format = detect_load_format(model)
    if load_format == "orbax":
        from dsjax.models import checkpoint

        return checkpoint.restore_params(model, config, dtype, shardings=shardings)
    return load_hf_params(model, config, dtype, shardings=shardings, load_format=load_format)
