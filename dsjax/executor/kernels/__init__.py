"""Attention kernels (Pallas, Triton-lowered) behind dsjax.models.attention.AttentionBackend.

See docs/kernels.md for the tiling, the split-KV combine and how to run benchmarks/bench_kernels.py.
"""
from dsjax.executor.kernels.backend import BACKEND_NAMES, PallasAttention, get_attention_backend
from dsjax.executor.kernels.decode import combine_splits, paged_decode_attention
from dsjax.executor.kernels.prefill import prefill_attention

__all__ = ["BACKEND_NAMES", "PallasAttention", "get_attention_backend", "combine_splits",
           "paged_decode_attention", "prefill_attention"]
