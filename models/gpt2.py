"""GPT-2 (Radford et al. 2019) in Flax: one of DistServe's own model families.

Pre-LN decoder with learned positions, biases everywhere, a GELU (tanh approximation) MLP,
a final LayerNorm and an LM head tied to the token embedding. Checkpoints store Conv1D
weights already as [in, out] (no transpose) and Q, K and V fused in one `c_attn`: the loader
splits it into the separate projections, so tensor parallelism shards each by heads.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from dsjax.models.base import HFTensor, ModelConfig, config_kwargs
from dsjax.models.layers import AttentionBlock, LayerModule, LayerNorm, PlainMLP, StageModule

# Flax module inside a layer -> (HF module, column range of c_attn's 3 * hidden outputs).
_LAYER_TENSORS = {"ln_1": ("ln_1", None), "ln_2": ("ln_2", None),
                  "q_proj": ("attn.c_attn", 0), "k_proj": ("attn.c_attn", 1),
                  "v_proj": ("attn.c_attn", 2), "o_proj": ("attn.c_proj", None),
                  "fc1": ("mlp.c_fc", None), "fc2": ("mlp.c_proj", None)}
_TOP_TENSORS = {"embed_tokens": "wte", "embed_positions": "wpe", "final_norm": "ln_f"}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class GPT2Config(ModelConfig):
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None          # None: 4 * n_embd
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    name: str = "gpt2"

    model_type: ClassVar[str] = "gpt2"
    HF_PREFIXES: ClassVar[tuple[str, ...]] = ("transformer.", "")
    COLUMN_PARALLEL: ClassVar[frozenset[str]] = frozenset({"q_proj", "k_proj", "v_proj", "fc1"})
    ROW_PARALLEL: ClassVar[frozenset[str]] = frozenset({"o_proj", "fc2"})
    FIRST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset({"embed_tokens", "embed_positions"})
    LAST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset({"final_norm"})
    tie_word_embeddings: ClassVar[bool] = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.activation_function not in ("gelu_new", "gelu"):
            raise ValueError(f"activation_function {self.activation_function!r} is not supported "
                             f"for gpt2: use gelu_new or gelu")

    # The interface's names for GPT-2's fields.
    hidden_size = property(lambda self: self.n_embd)
    num_hidden_layers = property(lambda self: self.n_layer)
    num_attention_heads = property(lambda self: self.n_head)
    num_key_value_heads = property(lambda self: self.n_head)
    head_dim = property(lambda self: self.n_embd // self.n_head)
    intermediate_size = property(lambda self: self.n_inner or 4 * self.n_embd)
    max_position_embeddings = property(lambda self: self.n_positions)

    def module(self, attention, mode, *, num_layers=None, first_stage=True, last_stage=True,
               kv_heads=None, dtype=jnp.float32):
        return GPT2Model(self, attention, mode, num_layers, first_stage, last_stage,
                         kv_heads or self.cache_kv_heads(), dtype)

    def hf_tensor(self, keys, layer):
        *modules, leaf = keys
        if modules[0] != "layers":
            return HFTensor(f"{_TOP_TENSORS[modules[0]]}.{_LEAVES[leaf]}")
        hf_module, third = _LAYER_TENSORS[modules[-1]]
        columns = None
        if third is not None:
            h = self.n_embd
            columns = (third * h, (third + 1) * h)
        return HFTensor(f"h.{layer}.{hf_module}.{_LEAVES[leaf]}", columns=columns)

    @classmethod
    def from_hf_dict(cls, d: dict, name: str):
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise ValueError(f"gpt2 with {flag}=true is not supported by dsjax")
        if d.get("scale_attn_weights") is False:
            raise ValueError("gpt2 with scale_attn_weights=false is not supported by dsjax")
        return cls(name=name, **config_kwargs(cls, d))

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("name")
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return d


class GPT2Layer(LayerModule):
    @nn.compact
    def __call__(self, carry, layer, meta):
        x, k_cache, v_cache = carry
        cfg = self.config
        norm = lambda name: LayerNorm(self.dtype, self.dtype, eps=cfg.layer_norm_epsilon,  # noqa
                                      name=name)
        h, k_cache, v_cache = AttentionBlock(
            cfg.n_head, cfg.n_head, self.kv_heads, cfg.head_dim, cfg.n_embd, self.attention,
            self.mode, self.dtype, self.dtype, qkv_bias=True, out_bias=True, name="self_attn",
        )(norm("ln_1")(x), layer, meta, k_cache, v_cache)
        x = x + h
        x = x + PlainMLP(cfg.intermediate_size, cfg.n_embd, cfg.activation_function,
                         self.dtype, self.dtype, name="mlp")(norm("ln_2")(x))
        return (x, k_cache, v_cache), None


class GPT2Model(StageModule):
    """One pipeline stage of GPT-2 (the whole model when first_stage and last_stage)."""

    def setup(self):
        cfg = self.config
        if self.first_stage or self.last_stage:
            self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype,
                                         param_dtype=self.dtype)
        if self.first_stage:
            self.embed_positions = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=self.dtype,
                                            param_dtype=self.dtype)
        if self.last_stage:
            self.final_norm = LayerNorm(self.dtype, self.dtype, eps=cfg.layer_norm_epsilon)
        self._num_layers, self.layers = self.scanned_layers(GPT2Layer)

    def __call__(self, inputs, kv_cache, meta):
        if self.first_stage:
            x = self.embed_tokens(inputs) + self.embed_positions(meta.positions)
        else:
            x = inputs.astype(self.dtype)
        x, (k_cache, v_cache) = self.run_layers(x, kv_cache, meta)
        if self.last_stage:
            x = self.final_norm(x)
        return x, (k_cache, v_cache)

    def logits(self, x):
        return self.embed_tokens.attend(x.astype(self.dtype)).astype(jnp.float32)  # tied
