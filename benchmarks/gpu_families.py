"""Each model family's greedy tokens with the Pallas attention kernels against the XLA
reference, and the start-up self-check's verdict, on whatever device JAX has.

    python benchmarks/gpu_families.py                     # on a GPU: bfloat16, small real sizes
    python benchmarks/gpu_families.py --smoke             # anywhere: tiny configs, float32

Dummy weights; prompts given as token ids (no tokenizer is needed). One colocated engine per
family and backend. A row reports how many of the greedy tokens agree before the first
difference: bfloat16 rounding may part two correct kernels after some tokens, so a short
agreement is a finding to look at, not by itself a failure; an exception is reported as such.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GPU_MODELS = ["opt-125m", "gpt2", "qwen2.5-0.5b", "llama-tiny", "qwen3-tiny"]
SMOKE_MODELS = ["opt-tiny", "llama-tiny", "qwen3-tiny"]


def greedy(model: str, backend: str, dtype: str, prompts, max_tokens: int):
    from dsjax import LLM, SamplingParams
    llm = LLM(model, load_format="dummy", dtype=dtype, mode="colocated",
              attention_backend=backend, block_size=16, num_blocks=256, log_status=False)
    try:
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=max_tokens,
                                           ignore_eos=True), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - start
    finally:
        llm.shutdown()


def verdict(model: str, dtype: str) -> str:
    """What attention_backend="auto" picks for this model on this device (the self-check)."""
    import warnings

    import jax.numpy as jnp

    from dsjax.executor.kernels.backend import get_attention_backend
    from dsjax.models.registry import config_from_name
    c = config_from_name(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = get_attention_backend("auto", num_heads=c.num_attention_heads,
                                       num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                       page_size=16, dtype=jnp.dtype(dtype),
                                       sliding_window=c.sliding_window)
    why = "; ".join(str(w.message) for w in caught)
    return type(chosen).__name__ + (f" ({why[:120]})" if why else "")


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
            for p, q in zip(a, b)]
    return f"{min(same)}/{len(a[0])} (per prompt: {', '.join(map(str, same))})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny configs in float32 (CPU, CI)")
    p.add_argument("--models", help="comma list (default: by --smoke)")
    p.add_argument("--dtype", help="default: bfloat16, float32 with --smoke")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    import jax
    import numpy as np
    dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    models = args.models.split(",") if args.models else (SMOKE_MODELS if args.smoke
                                                          else GPU_MODELS)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 200, n).tolist() for n in (5, 17, 40)]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {dtype}\n")
    print("| model | auto picks | pallas s | xla s | greedy tokens agreeing (pallas vs xla) |")
    print("|---|---|---|---|---|")
    failed = False
    for model in models:
        try:
            pick = verdict(model, dtype)
            got, t_pallas = greedy(model, "pallas", dtype, prompts, args.max_tokens)
            want, t_xla = greedy(model, "xla", dtype, prompts, args.max_tokens)
            print(f"| {model} | {pick} | {t_pallas:.2f} | {t_xla:.2f} | "
                  f"{agreement(got, want)} |", flush=True)
        except Exception as e:  # noqa: BLE001 - an unattended run reports and goes on
            failed = True
            print(f"| {model} | error | | | {type(e).__name__}: {str(e)[:200]} |", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
