"""LLaMA 2 and 3.x (Touvron et al. 2023; Grattafiori et al. 2024) in Flax, and the decoder that
Mistral and Qwen reuse with their switches (models/mistral.py, models/qwen.py).

Pre-norm decoder: RMSNorm, grouped-query attention with rotary embeddings (default, `linear`
or `llama3` scaling), SwiGLU feed-forward, a final RMSNorm and an LM head (untied for LLaMA,
tied for small Qwen). Parameter names mirror the Hugging Face checkpoint's:
model.layers.{i}.self_attn.{q,k,v,o}_proj, .mlp.{gate,up,down}_proj, .input_layernorm,
.post_attention_layernorm, model.embed_tokens, model.norm, lm_head.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from dsjax.models.base import HFTensor, ModelConfig, config_kwargs, hf_module_path, linear
from dsjax.models.layers import (ROPE_TYPES, AttentionBlock, GatedMLP, LayerModule, RMSNorm,
                                 StageModule, rope_inverse_frequencies)


def rope_from_hf(d: dict) -> tuple[float, tuple | None]:
    """(rope_theta, scaling) from a config.json: transformers 5's `rope_parameters` or the
    older top-level `rope_theta` and `rope_scaling`."""
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), ("linear", float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), ("llama3", float(scaling["factor"]),
                              float(scaling["low_freq_factor"]),
                              float(scaling["high_freq_factor"]),
                              float(scaling["original_max_position_embeddings"]))
    raise ValueError(f"rope scaling type {kind!r} is not supported by dsjax; supported: "
                     f"{', '.join(ROPE_TYPES)}")


def rope_to_hf(theta: float, scaling: tuple | None) -> dict:
    params = {"rope_theta": theta, "rope_type": "default"}
    if scaling is not None and scaling[0] == "linear":
        params.update(rope_type="linear", factor=scaling[1])
    elif scaling is not None:
        params.update(rope_type="llama3", factor=scaling[1], low_freq_factor=scaling[2],
                      high_freq_factor=scaling[3], original_max_position_embeddings=int(scaling[4]))
    return {"rope_parameters": params}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int = 0           # 0: as many as query heads
    head_dim: int = 0                      # 0: hidden_size / num_attention_heads
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None      # see models.layers.rope_inverse_frequencies
    tie_word_embeddings: bool = False
    attention_bias: bool = False           # q, k, v and o projections
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    name: str = "llama"

    model_type: ClassVar[str] = "llama"
    HF_PREFIXES: ClassVar[tuple[str, ...]] = ("model.", "")
    COLUMN_PARALLEL: ClassVar[frozenset[str]] = frozenset(
        {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
    ROW_PARALLEL: ClassVar[frozenset[str]] = frozenset({"o_proj", "down_proj"})
    FIRST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset({"embed_tokens"})
    LAST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset({"norm", "lm_head"})

    def __post_init__(self):
        if not self.num_key_value_heads:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}: set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported for "
                             f"{self.model_type}: dsjax implements silu (SwiGLU)")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # validates

    # Switches the Mistral and Qwen families turn.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def out_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return False

    @property
    def rope(self) -> tuple:
        """The rotary inverse frequencies, hashable (a static field of the modules)."""
        return tuple(rope_inverse_frequencies(self.head_dim, self.rope_theta,
                                              self.rope_scaling).tolist())

    def module(self, attention, mode, *, num_layers=None, first_stage=True, last_stage=True,
               kv_heads=None, dtype=jnp.float32):
        return LlamaModel(self, attention, mode, num_layers, first_stage, last_stage,
                          kv_heads or self.cache_kv_heads(), dtype)

    def hf_tensor(self, keys, layer):
        if keys[0] == "lm_head":
            return HFTensor("lm_head.weight", transpose=True, root=True)
        return linear(keys, hf_module_path(keys, layer))

    @classmethod
    def from_hf_dict(cls, d: dict, name: str):
        theta, scaling = rope_from_hf(d)
        kw = config_kwargs(cls, d)
        kw.update(rope_theta=theta, rope_scaling=scaling)
        return cls(name=name, **kw)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("name", "rope_theta", "rope_scaling"):
            d.pop(key)
        d.update(rope_to_hf(self.rope_theta, self.rope_scaling), model_type=self.model_type)
        return d


class LlamaLayer(LayerModule):
    @nn.compact
    def __call__(self, carry, layer, meta):
        x, k_cache, v_cache = carry
        cfg = self.config
        norm = lambda name: RMSNorm(self.dtype, self.dtype, cfg.rms_norm_eps, name=name)  # noqa
        h, k_cache, v_cache = AttentionBlock(
            cfg.num_attention_heads, cfg.num_key_value_heads, self.kv_heads, cfg.head_dim,
            cfg.hidden_size, self.attention, self.mode, self.dtype, self.dtype,
            qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None, rope=cfg.rope,
            sliding_window=cfg.sliding_window, name="self_attn",
        )(norm("input_layernorm")(x), layer, meta, k_cache, v_cache)
        x = x + h
        x = x + GatedMLP(cfg.intermediate_size, cfg.hidden_size, self.dtype, self.dtype,
                         cfg.mlp_bias, name="mlp")(norm("post_attention_layernorm")(x))
        return (x, k_cache, v_cache), None


class LlamaModel(StageModule):
    """One pipeline stage of LLaMA, Mistral or Qwen (the whole model when first_stage and
    last_stage)."""

    def setup(self):
        cfg = self.config
        if self.first_stage or (self.last_stage and cfg.tie_word_embeddings):
            self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                         param_dtype=self.dtype)
        if self.last_stage:
            self.norm = RMSNorm(self.dtype, self.dtype, cfg.rms_norm_eps)
            if not cfg.tie_word_embeddings:
                self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                                        param_dtype=self.dtype)
        self._num_layers, self.layers = self.scanned_layers(LlamaLayer)

    def __call__(self, inputs, kv_cache, meta):
        x = self.embed_tokens(inputs) if self.first_stage else inputs.astype(self.dtype)
        x, (k_cache, v_cache) = self.run_layers(x, kv_cache, meta)
        if self.last_stage:
            x = self.norm(x)
        return x, (k_cache, v_cache)

    def logits(self, x):
        x = x.astype(self.dtype)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)
