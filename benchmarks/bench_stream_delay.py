"""From a token's step to the HTTP stream: how long after the engine records a token does a
client read it.

    python benchmarks/bench_stream_delay.py --concurrency 1,16,64

Starts `python -m serving` (opt-tiny, dummy weights, the `uni` backend, a warm-up that covers
the run) and streams `/generate` requests, `concurrency` at a time. Each streamed record
carries the engine's timestamp of its token (`time.perf_counter()` when the decode instance
recorded it, right after its step's samples were read); the client stamps the record's
arrival with the same clock (CLOCK_MONOTONIC: one clock for every process on this machine).
The delay is the difference: the report's trip to the router, delivery into the request's
stream, the HTTP server's encoding and the socket. Printed: median, P90 and P99 per
concurrency, for async scheduling on (the default) and off.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_startup import free_port, wait_ready  # noqa: E402

PROMPT_LEN = 16


async def stream_delays(session, port: int, max_tokens: int, seed: int) -> list[float]:
    """Seconds from each token's engine timestamp to its record's arrival here."""
    body = {"prompt": [2] + [100 + (seed * 31 + i) % 40000 for i in range(PROMPT_LEN - 1)],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    delays = []
    async with session.post(f"http://127.0.0.1:{port}/generate", json=body) as response:
        async for line in response.content:
            arrived = time.perf_counter()
            if line.strip():
                record = json.loads(line)
                if record.get("timestamp") is not None:
                    delays.append(arrived - record["timestamp"])
    return delays


async def measure(port: int, args) -> list[tuple[int, np.ndarray]]:
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await stream_delays(session, port, args.max_tokens, 0)   # outside the figures
        results = []
        for c in args.concurrency:
            got = await asyncio.gather(*(stream_delays(session, port, args.max_tokens,
                                                       1000 * c + i) for i in range(c)))
            results.append((c, np.array([d for one in got for d in one])))
        return results


def run(args, async_scheduling: bool) -> list[tuple[int, np.ndarray]]:
    port = free_port()
    largest = max(args.concurrency)
    flag = "--async-scheduling" if async_scheduling else "--no-async-scheduling"
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model", args.model, "--use-dummy-weights",
         "--port", str(port), "--no-log-status", flag,
         "--warmup-max-prompt-len", str(PROMPT_LEN),
         "--warmup-max-context-len", str(PROMPT_LEN + args.max_tokens + 1),
         "--warmup-max-prefill-batch", str(largest), "--warmup-max-decode-batch", str(largest)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, server, time.perf_counter())
        return asyncio.run(measure(port, args))
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--concurrency", default="1,16,64",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    print("| scheduling | concurrent streams | tokens | median ms | P90 ms | P99 ms |")
    print("|---|---|---|---|---|---|")
    for overlap in (True, False):
        for c, d in run(args, overlap):
            print(f"| {'async' if overlap else 'sync'} | {c} | {len(d)} | "
                  f"{1e3 * np.median(d):.2f} | {1e3 * np.percentile(d, 90):.2f} | "
                  f"{1e3 * np.percentile(d, 99):.2f} |", flush=True)


if __name__ == "__main__":
    main()
