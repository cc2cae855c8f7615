"""OPT (Zhang et al. 2022) in Flax, shaped for a serving engine.

No padding per prompt: tokens arrive on one flat axis with their positions, and every layer's
K/V goes into a paged cache (see models/attention.py). Three modes share the weights:
  prefill  whole prompts packed together; attention among each prompt's own fresh tokens
  decode   one token per sequence; attention over the paged cache
  chunked  tokens continuing cached sequences (Sarathi-style mixed batches)
A pipeline stage is the same module with `first_stage` / `last_stage` and its share of layers.

OPT quirks kept: positions index a learned table with an offset of 2; ReLU; biases everywhere;
LM head tied to the token embedding; opt-350m projects 512-wide embeddings to 1024
(project_in / project_out, no bias) and is post-LN with no final layer norm.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.models.attention import (AttentionBackend, ChunkedMetadata, DecodeMetadata,
                                    PrefillMetadata)
from dsjax.models.config import OPTConfig

CALL_MODES = ("prefill", "decode", "chunked")


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the activation dtype (as HF does under autocast)."""
    dtype: Any
    param_dtype: Any
    use_affine: bool = True

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5)
        if self.use_affine:
            features = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
            y = y + self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        return y.astype(self.dtype)


class DecoderLayer(nn.Module):
    config: OPTConfig
    attention: AttentionBackend
    mode: str
    dtype: Any
    param_dtype: Any

    def _dense(self, features, name):
        return nn.Dense(features, use_bias=self.config.enable_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

    def _norm(self, name):
        return LayerNorm(self.dtype, self.param_dtype, self.config.layer_norm_elementwise_affine,
                         name=name)

    @nn.compact
    def __call__(self, carry, layer, meta):
        x, k_cache, v_cache = carry
        cfg = self.config
        n, hd = cfg.num_attention_heads, cfg.head_dim

        residual = x
        if cfg.do_layer_norm_before:
            x = self._norm("self_attn_layer_norm")(x)
        q = self._dense(cfg.hidden_size, "q_proj")(x).reshape(-1, n, hd)
        k = self._dense(cfg.hidden_size, "k_proj")(x).reshape(-1, n, hd)
        v = self._dense(cfg.hidden_size, "v_proj")(x).reshape(-1, n, hd)
        k_cache, v_cache = self.attention.write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping)
        if self.mode == "prefill":
            attn = self.attention.prefill(q, k, v, meta)
        elif self.mode == "decode":
            attn = self.attention.decode(q, k_cache, v_cache, layer, meta)
        else:
            attn = self.attention.chunked(q, k_cache, v_cache, layer, meta)
        x = self._dense(cfg.hidden_size, "out_proj")(attn.reshape(-1, n * hd))
        x = residual + x
        if not cfg.do_layer_norm_before:
            x = self._norm("self_attn_layer_norm")(x)

        residual = x
        if cfg.do_layer_norm_before:
            x = self._norm("final_layer_norm")(x)
        x = nn.relu(self._dense(cfg.ffn_dim, "fc1")(x))
        x = residual + self._dense(cfg.hidden_size, "fc2")(x)
        if not cfg.do_layer_norm_before:
            x = self._norm("final_layer_norm")(x)
        return (x, k_cache, v_cache), None


class OPTModel(nn.Module):
    """One pipeline stage of OPT (the whole model when first_stage and last_stage).

    __call__(inputs, kv_cache, meta) -> (outputs, kv_cache)
      inputs: token ids [T] on the first stage, else hidden states [T, hidden_size]
      kv_cache: (k, v), each [layers_of_this_stage, pages, page_size, heads, head_dim]
      outputs: hidden states [T, hidden] of every token (after the final layer norm on the
               last stage, whose `logits` method then gives the LM head's logits).
    """
    config: OPTConfig
    attention: AttentionBackend
    mode: str = "prefill"
    num_layers: int | None = None  # layers held by this stage; None = all
    first_stage: bool = True
    last_stage: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        if self.mode not in CALL_MODES:
            raise ValueError(f"mode must be one of {CALL_MODES}, got {self.mode!r}")
        if self.first_stage or self.last_stage:
            self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.word_embed_proj_dim,
                                         dtype=self.dtype, param_dtype=self.param_dtype)
        if self.first_stage:
            self.embed_positions = nn.Embed(cfg.max_position_embeddings + OPTConfig.POSITION_OFFSET,
                                            cfg.hidden_size, dtype=self.dtype,
                                            param_dtype=self.param_dtype)
            if cfg.has_projections:
                self.project_in = nn.Dense(cfg.hidden_size, use_bias=False, dtype=self.dtype,
                                           param_dtype=self.param_dtype)
        if self.last_stage:
            if cfg.has_final_layer_norm:
                self.final_layer_norm = LayerNorm(self.dtype, self.param_dtype,
                                                  cfg.layer_norm_elementwise_affine)
            if cfg.has_projections:
                self.project_out = nn.Dense(cfg.word_embed_proj_dim, use_bias=False,
                                            dtype=self.dtype, param_dtype=self.param_dtype)
        num_layers = cfg.num_hidden_layers if self.num_layers is None else self.num_layers
        scanned = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(0, nn.broadcast), length=num_layers)
        self.layers = scanned(cfg, self.attention, self.mode, self.dtype, self.param_dtype)
        self._num_layers = num_layers

    def __call__(self, inputs, kv_cache, meta: PrefillMetadata | DecodeMetadata | ChunkedMetadata):
        if self.first_stage:
            x = self.embed_tokens(inputs)
            if self.config.has_projections:
                x = self.project_in(x)
            x = x + self.embed_positions(meta.positions + OPTConfig.POSITION_OFFSET)
        else:
            x = inputs.astype(self.dtype)
        k_cache, v_cache = kv_cache
        (x, k_cache, v_cache), _ = self.layers((x, k_cache, v_cache),
                                               jnp.arange(self._num_layers), meta)
        if self.last_stage and self.config.has_final_layer_norm:
            x = self.final_layer_norm(x)
        return x, (k_cache, v_cache)

    def logits(self, x):
        """float32 logits [N, vocab] of final hidden states [N, hidden] (last stage only)."""
        if self.config.has_projections:
            x = self.project_out(x)
        return self.embed_tokens.attend(x.astype(self.dtype)).astype(jnp.float32)  # tied head


def abstract_params(config: OPTConfig, dtype=jnp.float32, attention=None):
    """Shapes and dtypes of the full model's params (no memory touched), for loaders and init."""
    from dsjax.models.attention import XLAAttention
    model = OPTModel(config, attention or XLAAttention(), "prefill", dtype=dtype, param_dtype=dtype)
    t = 2
    meta = PrefillMetadata(positions=jnp.zeros(t, jnp.int32), seq_ids=jnp.zeros(t, jnp.int32),
                           cu_seqlens=jnp.array([0, t], jnp.int32),
                           slot_mapping=jnp.zeros(t, jnp.int32),
                           last_token_idx=jnp.array([t - 1], jnp.int32))
    cache_shape = (config.num_hidden_layers, 1, 16, config.num_attention_heads, config.head_dim)
    cache = (jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype))

    def forward_and_head(module, tokens):
        hidden, _ = module(tokens, cache, meta)
        return module.logits(hidden)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(t, jnp.int32),
                                               method=forward_and_head))
    return shapes["params"]
