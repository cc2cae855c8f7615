"""Start-up and the first requests: ready time with a cold and a warm compilation cache, and
each prompt length's first TTFT against the same request's later.

    python benchmarks/bench_startup.py --model opt-125m

Each run starts `python -m serving` (its default warm-up compiles the workload's programs
before /health turns ready) and waits for /health. It then sends one request per prompt
length, one after another, lengths spread (log-spaced) over the model's whole context and sent
in a shuffled order, so no length is favoured by coming first; then the same requests again.
A length whose first TTFT is far above its second compiled something after ready. The first
run uses an empty cache directory; the second reuses it.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, server: subprocess.Popen, started: float, log=None) -> float:
    """Seconds from `started` until /health answers. `log`: the server's stderr lines, when a
    reader already drains them."""
    while True:
        if server.poll() is not None:
            time.sleep(0.5)   # let a reader drain the last lines (the traceback)
            tail = "".join(log) if log is not None else server.stderr.read()
            raise RuntimeError(f"server exited: {tail[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.2)


MAX_TOKENS = 8


def prompt_lengths(max_model_len: int, count: int, seed: int) -> list[int]:
    """`count` lengths log-spaced from 8 to the longest prompt that leaves room for MAX_TOKENS,
    shuffled."""
    longest = max_model_len - MAX_TOKENS
    lengths = sorted({int(round(x)) for x in np.geomspace(8, longest, count)})
    random.Random(seed).shuffle(lengths)
    return lengths


def ttft(port: int, prompt_len: int, first_token: int) -> float:
    """Time to the first streamed token of a prompt of `prompt_len` ids counting up from
    `first_token`: distinct starts share no cached prefix block."""
    body = json.dumps({"prompt": [2] + [100 + (first_token + i) % 40000
                                        for i in range(prompt_len - 1)],
                       "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.readline()
        first = time.perf_counter() - start
        response.read()
    return first


# The server's log lines that say where its start-up went (per instance: warm-up, budget).
STARTUP_LOG = ("warm-up", "prefill token budget")


def run(args, cache: str, lengths: list[int]) -> tuple[float, list[float], list[float], list]:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model", args.model, "--use-dummy-weights",
         "--port", str(port), "--no-log-status", "--compilation-cache-dir", cache,
         *shlex.split(args.extra)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    log: list[str] = []   # drained as it comes, so a chatty server never blocks on the pipe
    reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
    reader.start()
    try:
        ready = wait_ready(port, server, started, log)
        # Every request its own tokens, so the prefix cache cannot serve a later one.
        first = [ttft(port, n, 997 * i) for i, n in enumerate(lengths)]
        later = [ttft(port, n, 997 * (i + len(lengths))) for i, n in enumerate(lengths)]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        reader.join(timeout=10)
    return ready, first, later, [line.strip() for line in log
                                 if any(k in line for k in STARTUP_LOG)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--lengths", type=int, default=10, help="prompt lengths to try")
    p.add_argument("--seed", type=int, default=0, help="the lengths' shuffle")
    p.add_argument("--extra", default="", help="more `python -m serving` flags, one string")
    args = p.parse_args(argv)
    from dsjax.models.registry import config_from_name
    lengths = prompt_lengths(config_from_name(args.model).max_position_embeddings,
                             args.lengths, args.seed)
    cache = tempfile.mkdtemp(prefix="dsjax-startup-cache-")
    print(f"prompt lengths, in the order sent: {lengths}")
    print("| cache | ready s | worst first / later TTFT (length) | median first / later | "
          "first TTFT ms per length (later) |")
    print("|---|---|---|---|---|")
    logs = {}
    for label in ("cold", "warm"):
        ready, first, later, logs[label] = run(args, cache, lengths)
        ratios = [f / max(t, 1e-9) for f, t in zip(first, later)]
        worst = int(np.argmax(ratios))
        cells = ", ".join(f"{n}: {1e3 * f:.0f} ({1e3 * t:.0f})"
                          for n, f, t in sorted(zip(lengths, first, later)))
        print(f"| {label} | {ready:.1f} | {ratios[worst]:.2f} ({lengths[worst]}) | "
              f"{float(np.median(ratios)):.2f} | {cells} |", flush=True)
    for label, lines in logs.items():
        print(f"\nthe server's start-up, {label}:")
        for line in lines:
            print(f"    {line}")


if __name__ == "__main__":
    main()
