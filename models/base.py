"""The model interface: what a family declares so the engine can run it without knowing it.

A family is a frozen config dataclass that mixes in `ModelConfig` and names its Flax module.
It declares:
- its config, read from a Hugging Face `config.json` (`from_hf_dict`) and written back
  (`to_hf_dict`, for orbax checkpoints);
- its parameter tree (`module` + `abstract_params`), and where each leaf comes from in a
  Hugging Face checkpoint (`hf_tensor`);
- its tensor-parallel rules (`COLUMN_PARALLEL` / `ROW_PARALLEL` module names, `param_spec`)
  and what each pipeline stage holds (`FIRST_STAGE_KEYS` / `LAST_STAGE_KEYS`);
- KV heads and head_dim, for the page pool and migration (`cache_kv_heads`);
- parameter and FLOP counts, for the latency model and the placement search.

A stage module is called as `module.apply(params, inputs, (k_cache, v_cache), meta)` ->
(hidden states of every token, caches): token ids on the first stage, hidden states after;
the last stage's hidden states are final-normed and its `logits` method is the LM head.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.models.layers import cache_kv_heads

TP_AXIS = "tp"


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where a Flax leaf comes from: a checkpoint tensor (name without the checkpoint's
    prefix, unless `root`: outside the prefixed part, like an LM head), transposed when it is
    a torch Linear weight ([out, in]) and the leaf a Dense kernel ([in, out]), and optionally a
    column range of it (a fused QKV split apart)."""
    name: str
    transpose: bool = False
    columns: tuple[int, int] | None = None
    root: bool = False


# Flax leaf names -> Hugging Face leaf names.
HF_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def leaf_keys(path) -> tuple[str, ...]:
    """A jax tree path as its string keys."""
    return tuple(str(getattr(k, "key", k)) for k in path)


class ModelConfig:
    """Mixin of the family config dataclasses. Subclasses provide the fields or properties
    name, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, intermediate_size, max_position_embeddings, eos_token_id,
    bos_token_id, tie_word_embeddings; and the methods marked below."""

    model_type: ClassVar[str] = ""
    # Prefixes a checkpoint may put before every tensor name, tried in order.
    HF_PREFIXES: ClassVar[tuple[str, ...]] = ("",)
    COLUMN_PARALLEL: ClassVar[frozenset[str]] = frozenset()
    ROW_PARALLEL: ClassVar[frozenset[str]] = frozenset()
    FIRST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset()
    LAST_STAGE_KEYS: ClassVar[frozenset[str]] = frozenset()
    sliding_window: int | None = None

    # ---- what each family implements --------------------------------------------------------

    def module(self, attention, mode: str, *, num_layers: int | None = None,
               first_stage: bool = True, last_stage: bool = True, kv_heads: int | None = None,
               dtype=jnp.float32):
        """The Flax module of one pipeline stage (the whole model by default)."""
        raise NotImplementedError

    def hf_tensor(self, keys: tuple[str, ...], layer: int | None) -> HFTensor:
        """The checkpoint tensor of the Flax leaf at `keys` (of decoder layer `layer`)."""
        raise NotImplementedError

    @classmethod
    def from_hf_dict(cls, d: dict, name: str) -> "ModelConfig":
        raise NotImplementedError

    def to_hf_dict(self) -> dict:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token that ends a sequence (LLaMA 3's config lists several)."""
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)

    @property
    def layer_keys(self) -> str:
        return "layers"

    def cache_kv_heads(self, tp: int = 1) -> int:
        """KV heads the cache of a tp-way instance holds (layers.cache_kv_heads)."""
        return cache_kv_heads(self.num_key_value_heads, tp)

    def kv_head_repeat(self, tp: int = 1) -> int:
        """Cache heads per model KV head under tp: above 1 where tp exceeds the KV heads."""
        return self.cache_kv_heads(tp) // self.num_key_value_heads

    def check_tensor_parallel(self, tp: int) -> None:
        kv = self.num_key_value_heads
        for what, n in [("num_attention_heads", self.num_attention_heads),
                        ("intermediate size", self.intermediate_size)]:
            if n % tp:
                raise ValueError(f"tensor parallel size {tp} does not divide {self.name}'s {what} "
                                 f"({n}): choose a divisor")
        if kv % tp and tp % kv:
            raise ValueError(f"tensor parallel size {tp} neither divides nor is a multiple of "
                             f"{self.name}'s {kv} KV heads: choose a divisor or a multiple")

    def tensor_parallel_ok(self, tp: int) -> bool:
        try:
            self.check_tensor_parallel(tp)
        except ValueError:
            return False
        return True

    def param_spec(self, keys: tuple[str, ...], tp: int = 1) -> P:
        """Megatron sharding: column-parallel projections split by output columns (with their
        biases), row-parallel ones by input rows (bias replicated, added after the reduction);
        the rest replicated. K/V projections stay whole when tp exceeds the KV heads (each
        device computes every KV head and keeps its own)."""
        if len(keys) >= 3 and keys[0] == "layers":
            module, leaf = keys[-2], keys[-1]
            if module in ("k_proj", "v_proj") and self.num_key_value_heads % tp:
                return P()
            if module in self.COLUMN_PARALLEL:
                return P(None, None, TP_AXIS) if leaf == "kernel" else P(None, TP_AXIS)
            if module in self.ROW_PARALLEL and leaf == "kernel":
                return P(None, TP_AXIS, None)
        return P()

    def stage_keys(self, first: bool, last: bool) -> frozenset[str]:
        """Top-level param names a stage holds besides its layers."""
        keys = set()
        if first:
            keys |= self.FIRST_STAGE_KEYS
        if last:
            keys |= self.LAST_STAGE_KEYS
            if self.tie_word_embeddings:
                keys.add("embed_tokens")
        return frozenset(keys)

    def abstract_params(self, dtype=jnp.float32):
        """Shapes and dtypes of the whole model's params (no memory touched)."""
        from dsjax.models.attention import PrefillMetadata, XLAAttention
        model = self.module(XLAAttention(), "prefill", dtype=dtype)
        t = 2
        meta = PrefillMetadata(positions=jnp.zeros(t, jnp.int32), seq_ids=jnp.zeros(t, jnp.int32),
                               cu_seqlens=jnp.array([0, t], jnp.int32),
                               slot_mapping=jnp.zeros(t, jnp.int32),
                               last_token_idx=jnp.array([t - 1], jnp.int32))
        shape = (self.num_hidden_layers, 1, 16, self.cache_kv_heads(), self.head_dim)
        cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

        def forward_and_head(module, tokens):
            hidden, _ = module(tokens, cache, meta)
            return module.logits(hidden)

        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(t, jnp.int32),
                                                   method=forward_and_head))
        return shapes["params"]

    def num_params(self) -> int:
        return _count_params(self)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in every layer (the model's heads, unreplicated)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def matmul_flops_per_token(self) -> int:
        """FLOPs of one token's weight matmuls (2 x multiply-adds), LM head included: what
        scales a step's time where no profile of this family exists."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        gated = 3 if "gate_proj" in self.COLUMN_PARALLEL else 2
        per_layer = h * (q + 2 * kv) + q * h + gated * h * self.intermediate_size
        return 2 * (self.num_hidden_layers * per_layer + h * self.vocab_size)

    def attention_flops_per_token(self, context: int) -> int:
        """FLOPs of one token attending to `context` cached tokens (QK^T and PV)."""
        return 4 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * context


@functools.lru_cache(maxsize=64)
def _count_params(config: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(config.abstract_params()))


def hf_module_path(keys: tuple[str, ...], layer: int | None, renames: dict[str, str] | None = None
                   ) -> str:
    """The HF name of a leaf whose Flax module path mirrors the checkpoint's ("layers", i,
    module..., leaf), with some module names renamed."""
    *modules, leaf = keys
    renames = renames or {}
    parts = [renames.get(m, m) for m in modules]
    parts = [p for p in parts if p]
    if modules and modules[0] == "layers":
        parts.insert(1, str(layer))
    return ".".join(parts + [HF_LEAF_NAMES[leaf]])


def linear(keys: tuple[str, ...], name: str) -> HFTensor:
    """A Dense kernel from a torch Linear weight (transposed); its bias and any norm, embedding
    as they are."""
    return HFTensor(name, transpose=keys[-1] == "kernel")


def config_kwargs(cls, d: dict, renames: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields of dataclass `cls` present (and not null) in a config.json dict."""
    renames = renames or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in d.items():
        key = renames.get(key, key)
        if key in fields and key != "name" and value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out
