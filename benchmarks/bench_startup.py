"""Start-up and the first requests: ready time with a cold and a warm compilation cache, and
the first request's TTFT against the tenth's.

    python benchmarks/bench_startup.py --model opt-125m

Each run starts `python -m serving` (its default warm-up compiles the workload's programs
before /health turns ready), waits for /health, then sends ten requests one after another
(prompts of 17..161 tokens, so they land in different shape buckets) and times each one's
first token at the client. The first run uses an empty cache directory; the second reuses it.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, server: subprocess.Popen, started: float) -> float:
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.2)


def ttft(port: int, prompt_len: int) -> float:
    body = json.dumps({"prompt": [2] + [100 + i for i in range(prompt_len - 1)],
                       "max_tokens": 8, "ignore_eos": True, "stream": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.readline()
        first = time.perf_counter() - start
        response.read()
    return first


def run(args, cache: str) -> tuple[float, list[float]]:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model", args.model, "--use-dummy-weights",
         "--port", str(port), "--no-log-status", "--compilation-cache-dir", cache],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready = wait_ready(port, server, started)
        times = [ttft(port, 17 + 16 * i) for i in range(10)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    return ready, times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    args = p.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="dsjax-startup-cache-")
    print("| cache | ready s | TTFT 1st ms | TTFT 10th ms | 1st / 10th |")
    print("|---|---|---|---|---|")
    for label in ("cold", "warm"):
        ready, times = run(args, cache)
        print(f"| {label} | {ready:.1f} | {1e3 * times[0]:.0f} | {1e3 * times[-1]:.0f} | "
              f"{times[0] / times[-1]:.2f} |")


if __name__ == "__main__":
    main()
