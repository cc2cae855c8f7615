"""Layers the model families share: norms, rotary embeddings, the attention block over the
paged KV cache, and the feed-forward variants.

Attention is grouped-query in general (OPT and GPT-2 are groups of one). The block writes its
fresh K/V into the cache and calls the backend for the step's mode (models/attention.py).
When tensor parallelism splits the KV heads finer than they exist (tp > num_key_value_heads),
each KV head is repeated so that every device holds whole heads of the ones its query heads
use (`cache_kv_heads`), as vLLM replicates them.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.models.attention import AttentionBackend

CALL_MODES = ("prefill", "decode", "chunked")
ROPE_TYPES = ("default", "linear", "llama3")


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the activation dtype (as HF does under autocast)."""
    dtype: Any
    param_dtype: Any
    use_affine: bool = True
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_affine:
            features = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
            y = y + self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as LLaMA's: normalise in float32, cast back, then scale (HF's order)."""
    dtype: Any
    param_dtype: Any
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return (scale * y.astype(self.dtype)).astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] of rotary embeddings, in float64 on the host.
    scaling: None, ("linear", factor) or ("llama3", factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings), transformers' definitions."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    kind, factor = scaling[0], scaling[1]
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high, original = scaling[2:]
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


def apply_rope(x, positions, inv_freq: np.ndarray):
    """Rotate x [T, heads, head_dim] by its positions [T] (the half-split layout of HF's
    rotate_half), computing the angles in float32 as transformers does."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    a, b = x32[..., :half], x32[..., half:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(x.dtype)


def cache_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads one instance's cache holds under tensor degree tp: the model's, or tp when tp
    exceeds them (each repeated so every device has whole heads)."""
    return num_kv_heads if num_kv_heads % tp == 0 else tp


class AttentionBlock(nn.Module):
    """Projections, optional QK-norm and rotary embedding, the paged-cache attention of the
    step's mode and the output projection. `kv_heads` is the cache's KV head count
    (>= the model's: see cache_kv_heads)."""
    num_heads: int
    num_kv_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    attention: AttentionBackend
    mode: str
    dtype: Any
    param_dtype: Any
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm_eps: float | None = None      # Qwen3: RMSNorm on each head's q and k
    rope: Any = None                      # inverse frequencies (a hashable tuple), or None
    sliding_window: int | None = None

    def _dense(self, features, bias, name):
        return nn.Dense(features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)

    @nn.compact
    def __call__(self, x, layer, meta, k_cache, v_cache):
        n, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self._dense(n * d, self.qkv_bias, "q_proj")(x).reshape(-1, n, d)
        k = self._dense(hkv * d, self.qkv_bias, "k_proj")(x).reshape(-1, hkv, d)
        v = self._dense(hkv * d, self.qkv_bias, "v_proj")(x).reshape(-1, hkv, d)
        if self.qk_norm_eps is not None:
            q = RMSNorm(self.dtype, self.param_dtype, self.qk_norm_eps, name="q_norm")(q)
            k = RMSNorm(self.dtype, self.param_dtype, self.qk_norm_eps, name="k_norm")(k)
        if self.rope is not None:
            inv_freq = np.asarray(self.rope)
            q = apply_rope(q, meta.positions, inv_freq)
            k = apply_rope(k, meta.positions, inv_freq)
        if self.kv_heads != hkv:   # tp above the model's KV heads: each device a whole head
            k = jnp.repeat(k, self.kv_heads // hkv, axis=1)
            v = jnp.repeat(v, self.kv_heads // hkv, axis=1)
        k_cache, v_cache = self.attention.write_kv(k_cache, v_cache, layer, k, v,
                                                   meta.slot_mapping)
        window = {} if self.sliding_window is None else {"window": self.sliding_window}
        if self.mode == "prefill":
            out = self.attention.prefill(q, k, v, meta, **window)
        elif self.mode == "decode":
            out = self.attention.decode(q, k_cache, v_cache, layer, meta, **window)
        else:
            out = self.attention.chunked(q, k_cache, v_cache, layer, meta, **window)
        out = self._dense(self.hidden_size, self.out_bias, "o_proj")(out.reshape(-1, n * d))
        return out, k_cache, v_cache


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (LLaMA, Mistral, Qwen)."""
    intermediate_size: int
    hidden_size: int
    dtype: Any
    param_dtype: Any
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        dense = lambda f, name: nn.Dense(f, use_bias=self.bias, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=name)
        return dense(self.hidden_size, "down_proj")(
            nn.silu(dense(self.intermediate_size, "gate_proj")(x))
            * dense(self.intermediate_size, "up_proj")(x))


class PlainMLP(nn.Module):
    """fc2(act(fc1(x))) with biases (OPT: relu; GPT-2: gelu with the tanh approximation)."""
    intermediate_size: int
    hidden_size: int
    activation: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        act = {"relu": nn.relu, "gelu_new": lambda y: nn.gelu(y, approximate=True),
               "gelu": lambda y: nn.gelu(y, approximate=False)}[self.activation]
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=name)
        return dense(self.hidden_size, "fc2")(act(dense(self.intermediate_size, "fc1")(x)))


class LayerModule(nn.Module):
    """What every family's decoder layer is given (the scan passes these to each layer); its
    __call__(carry=(x, k_cache, v_cache), layer, meta) -> (carry, None)."""
    config: Any
    attention: AttentionBackend
    mode: str
    kv_heads: int
    dtype: Any


class StageModule(nn.Module):
    """What every family's stage module is: its config, the attention backend, the step's mode,
    its share of the layers, whether it holds the first (embedding) and last (norm, head) ends,
    the cache's KV heads and the dtype. Subclasses build their ends in setup() and call
    `self._num_layers, self.layers = self.scanned_layers(TheirLayer)`."""
    config: Any
    attention: AttentionBackend
    mode: str = "prefill"
    num_layers: int | None = None   # layers held by this stage; None = all
    first_stage: bool = True
    last_stage: bool = True
    kv_heads: int = 0
    dtype: Any = jnp.float32
    # True: the layers are one scanned module (params stacked on a leading layer axis, one
    # compiled body). False: one module per layer (params "layers_0", "layers_1", ...; see
    # per_layer_params), unrolled. XLA's CPU backend copies a scanned layer's weights out of
    # the stack every step (its matmuls need them contiguous): half of opt-125m's decode step
    # at batch 1.
    scan_layers: bool = True

    def scanned_layers(self, layer_cls):
        """(count, this stage's decoder layers: one scanned module, or a list of them)."""
        if self.mode not in CALL_MODES:
            raise ValueError(f"mode must be one of {CALL_MODES}, got {self.mode!r}")
        n = self.config.num_hidden_layers if self.num_layers is None else self.num_layers
        if not self.scan_layers:
            return n, [layer_cls(self.config, self.attention, self.mode, self.kv_heads,
                                 self.dtype) for _ in range(n)]
        scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast), length=n)
        return n, scanned(self.config, self.attention, self.mode, self.kv_heads, self.dtype)

    def run_layers(self, x, kv_cache, meta):
        k_cache, v_cache = kv_cache
        if not self.scan_layers:
            carry = (x, k_cache, v_cache)
            for i, layer in enumerate(self.layers):
                carry, _ = layer(carry, i, meta)
            x, k_cache, v_cache = carry
            return x, (k_cache, v_cache)
        (x, k_cache, v_cache), _ = self.layers((x, k_cache, v_cache),
                                               jnp.arange(self._num_layers), meta)
        return x, (k_cache, v_cache)


def per_layer_params(params: dict) -> dict:
    """A stage's params for scan_layers=False: the stacked "layers" subtree split into one
    subtree per layer ("layers_0", ...), as separate arrays; the rest unchanged."""
    stacked = params["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    split = {f"layers_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
             for i in range(n)}
    return {**{k: v for k, v in params.items() if k != "layers"}, **split}
