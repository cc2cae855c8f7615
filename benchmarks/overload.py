"""Overload: drive `python -m serving` far past what it can sustain and count what happens.

    python benchmarks/overload.py --model opt-tiny --overload 10 --seconds 60

1. Capacity: a closed loop of --concurrency clients for --calibrate-seconds measures the
   requests per second the server completes when saturated.
2. Overload: Poisson arrivals at --overload x that rate for --seconds, with the server's default
   admission (a request is refused with 503 + Retry-After when its estimated wait for a first
   token exceeds --max-queue-delay, 4 x the TTFT SLO by default), then again with admission
   by count only (--max-queue-delay huge), as before the engine-core issue.
For each: requests accepted and refused, accepted ones whose TTFT exceeded the stated multiple
of the SLO, and accepted ones lost (neither finished nor failed). Every accepted request is
awaited to its end.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time

import aiohttp

PROMPT = [2] + [100 + i for i in range(63)]      # 64 tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serving", "--model", args.model, "--use-dummy-weights",
           "--dtype", "float32", "--port", str(port), "--ttft-slo", str(args.ttft_slo),
           "--no-log-status", *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(1)
    raise RuntimeError("server did not start")


async def one_request(session, url: str, max_tokens: int) -> tuple[str, float | None]:
    """('ok' | 'refused' | 'failed', TTFT seconds)."""
    start = time.perf_counter()
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    try:
        async with session.post(url, json=body) as response:
            if response.status == 503:
                return "refused", None
            if response.status != 200:
                return "failed", None
            ttft = None
            async for line in response.content:
                if ttft is None and line.strip():
                    ttft = time.perf_counter() - start
                if b'"error"' in line:
                    return "failed", ttft
            return "ok", ttft
    except aiohttp.ClientError:
        return "failed", None


async def capacity(url: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    done, stop = 0, time.perf_counter() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def client():
            nonlocal done
            while time.perf_counter() < stop:
                if (await one_request(session, url, max_tokens))[0] == "ok":
                    done += 1
        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
    return done / (time.perf_counter() - start)


async def overload(url: str, rate: float, seconds: float, max_tokens: int) -> list:
    rng = random.Random(0)
    tasks = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            tasks.append(asyncio.create_task(one_request(session, url, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def report(label: str, results: list, slo: float, multiple: float) -> str:
    accepted = [t for kind, t in results if kind == "ok"]
    refused = sum(kind == "refused" for kind, _ in results)
    failed = sum(kind == "failed" for kind, _ in results)
    late = sum(t is not None and t > multiple * slo for t in accepted)
    worst = max((t for t in accepted if t is not None), default=0.0)
    return (f"| {label} | {len(results)} | {len(accepted)} | {refused} | {failed} | {late} | "
            f"{worst:.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--ttft-slo", type=float, default=2.5)
    p.add_argument("--slo-multiple", type=float, default=4.0,
                   help="the server's default --max-queue-delay is this x --ttft-slo")
    p.add_argument("--overload", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--calibrate-seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    rows = []
    for label, extra in [("default admission", []),
                         ("count bound only", ["--max-queue-delay", "1e9"])]:
        port = free_port()
        server = start_server(args, port, extra)
        url = f"http://127.0.0.1:{port}/generate"
        try:
            rate = asyncio.run(capacity(url, args.concurrency, args.calibrate_seconds,
                                        args.max_tokens))
            results = asyncio.run(overload(url, args.overload * rate, args.seconds,
                                           args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=60)
        rows.append(report(f"{label} (capacity {rate:.1f} req/s, sent at "
                           f"{args.overload * rate:.0f} req/s)", results, args.ttft_slo,
                           args.slo_multiple))
    print(f"| server | sent | accepted | refused 503 | failed/lost | accepted with TTFT > "
          f"{args.slo_multiple:g} x {args.ttft_slo:g} s | worst TTFT s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
