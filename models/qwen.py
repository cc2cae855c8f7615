"""Qwen2 / Qwen2.5 and Qwen3 (Qwen team 2024, 2025): LLaMA's decoder with their switches.

Qwen2: biases on the Q, K and V projections (none on O), tied embeddings in the small sizes.
Qwen3: RMSNorm on each head's queries and keys before the rotary embedding, no biases, and a
head_dim that need not be hidden_size / num_attention_heads.
Sliding-window layers (`use_sliding_window`) are refused: released checkpoints leave it off.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from dsjax.models.llama import LlamaConfig


class _NoSlidingLayers:
    """Qwen's per-layer sliding windows are refused at load."""

    @classmethod
    def from_hf_dict(cls, d: dict, name: str):
        if d.get("use_sliding_window"):
            raise ValueError(f"{cls.model_type} with use_sliding_window=true is not supported by "
                             f"dsjax (per-layer sliding windows); released checkpoints set it "
                             f"false")
        return super().from_hf_dict(d, name)


@dataclasses.dataclass(frozen=True)
class Qwen2Config(_NoSlidingLayers, LlamaConfig):
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151643
    name: str = "qwen2"

    model_type: ClassVar[str] = "qwen2"

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def out_bias(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Qwen3Config(_NoSlidingLayers, LlamaConfig):
    vocab_size: int = 151936
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    name: str = "qwen3"

    model_type: ClassVar[str] = "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return True
