"""Replay a benchmark workload against an in-process Engine (no HTTP) and collect per-request results.

    from dsjax.eval.replay import replay
    results = replay(engine, dataset.sample(100), rate=4.0)
    both, ttft_ok, tpot_ok = dsjax.eval.results.attainment(results, ttft_slo, tpot_slo)

Arrivals are the benchmark client's (`dsjax.eval.arrivals.arrival_offsets`): gamma gaps with shape
1/cv^2 and scale cv^2/rate drawn from np.random.RandomState(seed), the first request at 0. Each
request is sent as the client sends it (temperature 1, top_p 1, max_tokens = output_len,
ignore_eos) with a prompt of prompt_len random token ids (dummy weights do not need text).
start_time is the scheduled arrival on the engine's clock (time.perf_counter), so a late send
(this thread losing the CPU) counts against TTFT as it would at a real client.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from dsjax.eval.arrivals import arrival_offsets
from dsjax.eval.results import RequestResult
from dsjax.sampling_params import SamplingParams


def _prompt_and_output(req) -> tuple[list[int] | int, int]:
    """(token ids, or a length to fill with random ids; output_len)."""
    if hasattr(req, "prompt_len"):
        return int(req.prompt_len), int(req.output_len)
    prompt, output_len = req
    return (int(prompt) if isinstance(prompt, (int, np.integer)) else [int(t) for t in prompt],
            int(output_len))


def replay(engine, requests: Sequence, rate: float, cv: float = 1.0, seed: int = 0,
           temperature: float = 1.0, timeout: float | None = 600.0,
           offsets: Sequence[float] | None = None) -> list[RequestResult]:
    """Send `requests` (TestRequest-like objects with prompt_len/output_len, or
    (prompt_ids or prompt_len, output_len) pairs) to `engine` at `rate` req/s and wait for all.
    Returns one RequestResult per request, in input order. `offsets` overrides the arrival draw;
    `temperature` 0 makes every step greedy (no sampler sort; see docs/validation.md)."""
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(seed)
    prepared = []
    for req in requests:
        prompt, output_len = _prompt_and_output(req)
        ids = rng.integers(4, vocab, prompt).tolist() if isinstance(prompt, int) else prompt
        prepared.append((ids, len(ids), output_len))
    at = np.asarray(offsets if offsets is not None else
                    arrival_offsets(len(prepared), rate, cv, seed), float)
    if len(at) != len(prepared):
        raise ValueError(f"{len(at)} arrival offsets for {len(prepared)} requests")

    streams = []
    t0 = time.perf_counter() + 0.05
    for (ids, _, output_len), offset in zip(prepared, at):
        arrival = t0 + float(offset)
        delay = arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=output_len,
                                ignore_eos=True)
        streams.append((engine.add_request(ids, params, arrival_time=arrival), arrival))

    results = []
    for (stream, arrival), (_, prompt_len, output_len) in zip(streams, prepared):
        out = stream.result(timeout=timeout)
        results.append(RequestResult.from_timestamps(prompt_len, output_len, arrival,
                                                     out.token_timestamps,
                                                     [dict(e) for e in out.lifetime_events]))
    return results


def _buckets(lo: int, hi: int) -> list[int]:
    from dsjax.executor.runner import bucket
    out, b = [], bucket(lo)
    while b <= bucket(hi):
        out.append(b)
        b *= 2
    return out


def warm_up(engine, max_prompt_len: int, max_context_len: int, max_prefill_batch: int = 64,
            max_decode_batch: int = 128, temperature: float = 1.0) -> int:
    """Compile the prefill and decode shape buckets a workload with these bounds can reach, on
    every instance, before anything is measured (a compile takes ~0.5 s on a CPU and would
    land in some request's TTFT or TPOT). Call it on an idle engine: it writes into free KV
    pages. Returns the number of steps run."""
    from dsjax.engine.request import Request
    from dsjax.executor.runner import MIN_TOKEN_BUCKET

    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=1)
    steps = 0
    for inst in engine.instances:
        runner = inst.runner
        page, pages = runner.page_size, runner.num_pages
        max_tokens = min(runner.max_tokens_per_batch, max_prefill_batch * max_prompt_len)

        def tables(lengths):
            at, out = 0, []
            for n in lengths:
                k = -(-n // page)
                out.append([(at + j) % pages for j in range(k)])
                at += k
            return out

        if inst in engine.prefill_instances:
            for b in _buckets(1, min(max_prefill_batch, runner.max_batch_size)):
                for t in _buckets(max(MIN_TOKEN_BUCKET, b), max_tokens):
                    if t > b * max_prompt_len * 2 or t // b > runner.max_blocks_per_request * page:
                        continue
                    lens = [t // b + (1 if i < t % b else 0) for i in range(b)]
                    reqs = [Request(f"w{i}", None, [5] * n, params, i) for i, n in enumerate(lens)]
                    runner.prefill(reqs, tables(lens))
                    steps += 1
        if inst in engine.decode_instances:
            max_width = min(-(-max_context_len // page), runner.max_blocks_per_request)
            for b in _buckets(8, min(max_decode_batch, runner.max_batch_size)):
                for w in _buckets(1, max_width):
                    n = w * page
                    reqs = []
                    for i in range(b):
                        r = Request(f"w{i}", None, [5] * (n - 1), params, i)
                        r.output_token_ids.append(5)
                        reqs.append(r)
                    runner.decode(reqs, tables([n] * b))
                    steps += 1
    return steps
