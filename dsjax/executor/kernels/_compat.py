"""Version shims for the Pallas Triton-lowered API, and helpers shared by the kernels.

jax 0.10 exposes the Triton flavour as `jax.experimental.pallas.triton` with `CompilerParams`;
older releases had `jax.experimental.pallas.gpu` with `TritonCompilerParams`, and from 0.11 the
Triton path prints deprecation warnings (Mosaic GPU is the successor). Everything version
dependent lives here so the kernels read the same on all of them.
"""
from __future__ import annotations

import importlib
import warnings

import jax

# Filter before importing the module: the Triton deprecation warning may fire on import.
# Only warnings that name Triton are hidden; every other deprecation stays visible.
for _category in (DeprecationWarning, FutureWarning, UserWarning):
    warnings.filterwarnings("ignore", message=r"(?is).*triton.*deprecat", category=_category)
    warnings.filterwarnings("ignore", message=r"(?is).*deprecat.*triton", category=_category)


def _import_triton_api():
    for name in ("jax.experimental.pallas.triton", "jax.experimental.pallas.gpu"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("Pallas Triton API not found: install jax>=0.4.31 "
                      "(jax.experimental.pallas.triton or .gpu)")


plgpu = _import_triton_api()
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def compiler_params(num_warps: int, num_stages: int):
    """Triton launch parameters under whichever class name this jax version uses."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def head_dim_chunks(head_dim: int) -> tuple[tuple[int, int], ...]:
    """Split head_dim into power-of-two (start, size) pieces, largest first: 80 -> (0,64),(64,16).

    Triton tiles must have power-of-two shapes; computing q.k and p.v piecewise lets head
    sizes like OPT-2.7b's 80 run natively, without padding the KV cache (a full copy).
    """
    if head_dim % 16:
        raise ValueError(f"head_dim={head_dim} is not a multiple of 16: the Pallas kernels need "
                         "it (use the 'xla' attention backend for this model)")
    chunks, start, rest = [], 0, head_dim
    while rest:
        size = 1 << (rest.bit_length() - 1)
        chunks.append((start, size))
        start, rest = start + size, rest - size
    return tuple(chunks)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _varying_kwarg(inputs) -> dict:
    """The ShapeDtypeStruct keyword that marks an output as varying over the manual mesh axes
    its inputs vary over. pallas_call inside shard_map(check_vma=True) refuses outputs without
    it; jax 0.10 calls it `manual_axis_type`, earlier releases `vma`."""
    avals = [jax.typeof(x) for x in inputs]
    mats = [a.manual_axis_type for a in avals if getattr(a, "manual_axis_type", None) is not None]
    if mats:
        widest = max(mats, key=lambda m: len(m.varying))
        union = frozenset().union(*(m.varying for m in mats))
        if union != widest.varying:
            widest = type(widest)(varying=union)
        return {"manual_axis_type": widest}
    vmas = [a.vma for a in avals if getattr(a, "vma", None) is not None]
    return {"vma": frozenset().union(*vmas)} if vmas else {}


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """jax.ShapeDtypeStruct for a pallas_call output computed from `inputs` (shard_map-safe)."""
    return jax.ShapeDtypeStruct(shape, dtype, **_varying_kwarg(inputs))
