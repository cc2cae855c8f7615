"""Mistral (Jiang et al. 2023): LLaMA's decoder with sliding-window attention where its
config.json sets a window (Mistral 7B v0.1: 4096 tokens; later versions set none). The window
is applied in attention: a token sees the `sliding_window` most recent tokens, itself
included (transformers' definition). The KV cache keeps every token (no rolling buffer)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from dsjax.models.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    sliding_window: int | None = None
    head_dim: int = 0
    vocab_size: int = 32000
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    name: str = "mistral"

    model_type: ClassVar[str] = "mistral"

    def __post_init__(self):
        super().__post_init__()
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.attention_bias or self.mlp_bias:
            raise ValueError("Mistral checkpoints have no biases; this config.json sets some")
