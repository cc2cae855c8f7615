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
