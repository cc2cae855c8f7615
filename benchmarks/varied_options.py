"""Valid requests with varied sampling options after ready: nothing compiles, memory stays
flat, and no request is much slower than its plain twin.

    python benchmarks/varied_options.py                   # 1,000 requests, opt-tiny, CPU
    python benchmarks/varied_options.py --requests 200 --mode colocated

Each request draws its own mix of what OpenAI and vLLM clients send (logprobs, prompt
logprobs, penalties, a logit_bias of up to 300 entries, n and best_of, min_tokens with stop
ids, stop strings, seeds, top-k, top-p). Requests run one at a time, each followed by its
plain twin: the same prompt and the same number of sequences (n, best_of), greedy, with no
other option, as many tokens as the request's longest sequence produced (ignore_eos). Prints the programs lowered after ready (by name), the process's
memory mappings before and after, and the latency ratio request / twin (median, P99, max).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from dsjax.sampling_params import MAX_LOGIT_BIAS, SamplingParams


def varied_params(rng: random.Random, vocab: int, *, prompt_logprobs: bool = True,
                  max_tokens: int = 24) -> SamplingParams:
    """One request's options, each present with some probability (every field a client may
    send that used to pick a program)."""
    kw = dict(max_tokens=rng.randint(1, max_tokens), temperature=rng.choice([0, 0.7, 1.0]),
              top_p=rng.choice([1.0, 0.9, 0.5]), top_k=rng.choice([-1, 5, 50]),
              seed=rng.randint(0, 10 ** 6))
    if rng.random() < 0.3:
        kw["logprobs"] = rng.randint(0, 20)
    if prompt_logprobs and rng.random() < 0.2:
        kw["prompt_logprobs"] = rng.randint(0, 20)
    for name, low, high in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
                            ("repetition_penalty", 0.5, 2)):
        if rng.random() < 0.25:
            kw[name] = rng.uniform(low, high)
    if rng.random() < 0.25:
        kw["logit_bias"] = {rng.randrange(vocab): rng.uniform(-100, 100)
                            for _ in range(rng.randint(1, MAX_LOGIT_BIAS))}
    if rng.random() < 0.25:
        kw["n"] = rng.randint(1, 4)
        if rng.random() < 0.5:
            kw["best_of"] = kw["n"] + rng.randint(0, 2)
    if rng.random() < 0.2:
        kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
        kw["stop_token_ids"] = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.2:
        kw["stop"] = rng.sample(["a", "the", ".", "\n", "ing"], 2)
    return SamplingParams(**kw)


def streamable(params: SamplingParams) -> bool:
    return params.best_of is None or params.best_of == params.n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--mode", default="disaggregated")
    ap.add_argument("--model", default="opt-tiny")
    ap.add_argument("--max-prompt", type=int, default=60)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=2")
    from dsjax import Engine, EngineConfig
    from dsjax.executor.compile_watch import CompileWatch, memory_mappings

    engine = Engine(EngineConfig(
        model=args.model, load_format="dummy", mode=args.mode, compilation_cache_dir="",
        warmup_max_prompt_len=args.max_prompt, warmup_max_context_len=args.max_prompt + 30,
        warmup_max_decode_batch=8, decoding_max_batch_size=8, context_max_batch_size=8,
        decoding_max_tokens_per_batch=256 if args.mode == "chunked" else 65536))
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    ratios, made = [], None
    maps_before = memory_mappings()
    start = time.perf_counter()
    with CompileWatch() as watch:
        for _ in range(args.requests):
            params = varied_params(rng, vocab, prompt_logprobs=args.mode != "chunked")
            prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(1, args.max_prompt))]
            began = time.perf_counter()
            out = engine.add_request(prompt, params, stream=streamable(params)).result(600)
            took = time.perf_counter() - began
            longest = max(len(o.token_ids) for o in out.outputs)
            twin = SamplingParams(temperature=0, max_tokens=longest, ignore_eos=True,
                                  n=params.n, best_of=params.best_of)
            began = time.perf_counter()
            engine.add_request(prompt, twin, stream=streamable(twin)).result(600)
            ratios.append((took / (time.perf_counter() - began), params))
        made = watch.count, watch.describe()
    maps_after = memory_mappings()
    engine.shutdown()
    ratios.sort(key=lambda r: r[0])
    worst = ratios[-3:]
    ratios = [r for r, _ in ratios]
    print(f"{args.requests} requests ({args.mode}, {args.model}) in "
          f"{time.perf_counter() - start:.0f} s, each followed by its plain twin")
    print(f"programs made after ready: {made[0]} ({made[1]})")
    print(f"memory mappings: {maps_before} before, {maps_after} after")
    print(f"latency / plain twin: median {statistics.median(ratios):.2f}, "
          f"P99 {ratios[int(0.99 * (len(ratios) - 1))]:.2f}, max {ratios[-1]:.2f}")
    for ratio, params in worst:
        print(f"  {ratio:.2f}x: {params}")


if __name__ == "__main__":
    main()
