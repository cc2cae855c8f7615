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

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from dsjax.models.base import ModelConfig, config_kwargs, hf_module_path, linear
from dsjax.models.layers import AttentionBlock, LayerModule, LayerNorm, PlainMLP, StageModule

# Flax module names that the checkpoint spells otherwise ("" drops the level).
_HF_RENAMES = {"o_proj": "out_proj", "mlp": ""}


@dataclasses.dataclass(frozen=True)
class OPTConfig(ModelConfig):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_dim: int
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 0  # 0 means equal to hidden_size (no project_in/out)
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    name: str = "opt"

    model_type: ClassVar[str] = "opt"
    HF_PREFIXES: ClassVar[tuple[str, ...]] = ("model.decoder.", "decoder.", "")
    COLUMN_PARALLEL: ClassVar[frozenset[str]] = frozenset({"q_proj", "k_proj", "v_proj", "fc1"})
    ROW_PARALLEL: ClassVar[frozenset[str]] = frozenset({"o_proj", "fc2"})
    FIRST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"embed_tokens", "embed_positions", "project_in"})
    LAST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset({"final_layer_norm", "project_out"})
    tie_word_embeddings: ClassVar[bool] = True
    # OPT's learned position table has two extra rows: position p is row p + 2.
    POSITION_OFFSET: ClassVar[int] = 2

    def __post_init__(self):
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")

    num_key_value_heads = property(lambda self: self.num_attention_heads)
    intermediate_size = property(lambda self: self.ffn_dim)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    def num_params(self) -> int:
        h, f, e, v = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim, self.vocab_size
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        total = self.num_hidden_layers * per_layer + v * e + (self.max_position_embeddings + 2) * h
        if self.has_projections:
            total += 2 * h * e
        if self.has_final_layer_norm:
            total += 2 * h
        return total

    def module(self, attention, mode, *, num_layers=None, first_stage=True, last_stage=True,
               kv_heads=None, dtype=jnp.float32):
        return OPTModel(self, attention, mode, num_layers=num_layers, first_stage=first_stage,
                        last_stage=last_stage, kv_heads=kv_heads or self.cache_kv_heads(),
                        dtype=dtype)

    def hf_tensor(self, keys, layer):
        return linear(keys, hf_module_path(keys, layer, _HF_RENAMES))

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "opt") -> "OPTConfig":
        if d.get("activation_function", "relu") != "relu":
            raise ValueError(f"unsupported activation_function {d['activation_function']!r}: "
                             f"OPT uses relu")
        kw = config_kwargs(cls, d)
        # HF spells the no-final-LN switch with a leading underscore.
        if d.get("_remove_final_layer_norm"):
            kw["remove_final_layer_norm"] = True
        return cls(name=name, **kw)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("name")
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        d.update(model_type="opt", activation_function="relu", architectures=["OPTForCausalLM"])
        return d


class DecoderLayer(LayerModule):
    def _norm(self, name):
        return LayerNorm(self.dtype, self.dtype, self.config.layer_norm_elementwise_affine,
                         name=name)

    @nn.compact
    def __call__(self, carry, layer, meta):
        x, k_cache, v_cache = carry
        cfg = self.config
        pre = cfg.do_layer_norm_before
        attn_norm, ffn_norm = self._norm("self_attn_layer_norm"), self._norm("final_layer_norm")
        h, k_cache, v_cache = AttentionBlock(
            cfg.num_attention_heads, cfg.num_attention_heads, self.kv_heads, cfg.head_dim,
            cfg.hidden_size, self.attention, self.mode, self.dtype, self.dtype,
            qkv_bias=cfg.enable_bias, out_bias=cfg.enable_bias, name="self_attn",
        )(attn_norm(x) if pre else x, layer, meta, k_cache, v_cache)
        x = x + h
        if not pre:
            x = attn_norm(x)
        h = PlainMLP(cfg.ffn_dim, cfg.hidden_size, "relu", self.dtype, self.dtype,
                     name="mlp")(ffn_norm(x) if pre else x)
        x = x + h
        if not pre:
            x = ffn_norm(x)
        return (x, k_cache, v_cache), None


class OPTModel(StageModule):
    """One pipeline stage of OPT (the whole model when first_stage and last_stage).

    __call__(inputs, kv_cache, meta) -> (outputs, kv_cache)
      inputs: token ids [T] on the first stage, else hidden states [T, hidden_size]
      kv_cache: (k, v), each [layers_of_this_stage, pages, page_size, heads, head_dim]
      outputs: hidden states [T, hidden] of every token (after the final layer norm on the
               last stage, whose `logits` method then gives the LM head's logits).
    """
    def setup(self):
        cfg = self.config
        dense = lambda f: nn.Dense(f, use_bias=False, dtype=self.dtype,  # noqa: E731
                                   param_dtype=self.dtype)
        if self.first_stage or self.last_stage:
            self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.word_embed_proj_dim,
                                         dtype=self.dtype, param_dtype=self.dtype)
        if self.first_stage:
            self.embed_positions = nn.Embed(cfg.max_position_embeddings + cfg.POSITION_OFFSET,
                                            cfg.hidden_size, dtype=self.dtype,
                                            param_dtype=self.dtype)
            if cfg.has_projections:
                self.project_in = dense(cfg.hidden_size)
        if self.last_stage:
            if cfg.has_final_layer_norm:
                self.final_layer_norm = LayerNorm(self.dtype, self.dtype,
                                                  cfg.layer_norm_elementwise_affine)
            if cfg.has_projections:
                self.project_out = dense(cfg.word_embed_proj_dim)
        self._num_layers, self.layers = self.scanned_layers(DecoderLayer)

    def __call__(self, inputs, kv_cache, meta):
        if self.first_stage:
            x = self.embed_tokens(inputs)
            if self.config.has_projections:
                x = self.project_in(x)
            x = x + self.embed_positions(meta.positions + self.config.POSITION_OFFSET)
        else:
            x = inputs.astype(self.dtype)
        x, (k_cache, v_cache) = self.run_layers(x, kv_cache, meta)
        if self.last_stage and self.config.has_final_layer_norm:
            x = self.final_layer_norm(x)
        return x, (k_cache, v_cache)

    def logits(self, x):
        """float32 logits [N, vocab] of final hidden states [N, hidden] (last stage only)."""
        if self.config.has_projections:
            x = self.project_out(x)
        return self.embed_tokens.attend(x.astype(self.dtype)).astype(jnp.float32)  # tied head
