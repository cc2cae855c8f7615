"""Overload: drive `python -m serving` far past what it can sustain and count what happens.

    python benchmarks/overload.py --model opt-tiny --overload 10 --seconds 60

1. Capacity: a closed loop of --concurrency clients for --calibrate-seconds measures the
   requests per second the server completes when saturated.
2. Overload: Poisson arrivals at --overload x that rate for --seconds, with the server's default
   admission (a request is refused with 503 + Retry-After when its estimated time to first token
   or per output token exceeds --slo-multiple x its SLO), then again with admission by count
   only (both bounds off), as before issue 18.
The workload mixes prompt lengths (4 to 256 tokens) and output lengths (2 to 64 tokens), seeded,
streamed from /generate with ignore_eos. For each run: requests sent, accepted, refused by cause
(the server's /metrics), failed or lost (accepted, then neither finished nor failed cleanly), and
accepted ones whose TTFT or TPOT exceeded the multiple of its SLO, as the client saw them and
by the server's own timestamps (the client shares the CPU, so its clock adds its own delays).
Every accepted request is awaited to its end. Writes the table (markdown) to stdout and every
request to --out as JSON lines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serving", "--model", args.model, "--use-dummy-weights",
           "--dtype", "float32", "--port", str(port), "--ttft-slo", str(args.ttft_slo),
           "--tpot-slo", str(args.tpot_slo), "--slo-multiple", str(args.slo_multiple),
           "--no-log-status", *args.server_args.split(), *extra]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env,
                              cwd=REPO)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(1)
    raise RuntimeError("server did not start")


def workload(rng: random.Random) -> tuple[list[int], int]:
    """A prompt (token ids) and max_tokens: lengths log-uniform, as chat traffic is skewed."""
    prompt_len = int(round(2 ** rng.uniform(2, 8)))           # 4 .. 256
    output_len = int(round(2 ** rng.uniform(1, 6)))           # 2 .. 64
    return [2] + [rng.randrange(100, 50000) for _ in range(prompt_len - 1)], output_len


def refusal_cause(status: int, text: str) -> str:
    for words, cause in (("first token", "ttft_slo"), ("per output token", "tpot_slo"),
                         ("admission bound", "queue_full"),
                         ("--max-client-connections", "client_connections"),
                         ("--max-connections", "max_connections")):
        if words in text:
            return cause
    return f"other {status}"


async def one_request(session, url: str, prompt: list[int], max_tokens: int) -> dict:
    """{"kind": ok | refused | failed (an error answer) | lost (accepted, then neither
    finished nor failed cleanly) | unanswered (no answer at all), cause, ttft, tpot (client
    clock), server_ttft, server_tpot (the server's token timestamps), tokens}."""
    start = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    result = {"prompt_len": len(prompt), "max_tokens": max_tokens, "kind": "failed"}
    accepted = False
    try:
        async with session.post(url, json=body) as response:
            if response.status == 503:
                text = await response.text()
                return {**result, "kind": "refused", "cause": refusal_cause(503, text),
                        "retry_after": response.headers.get("Retry-After")}
            if response.status != 200:
                return {**result, "cause": f"HTTP {response.status}"}
            accepted = True
            arrived, records = [], []
            async for line in response.content:
                if not line.strip():
                    continue
                record = json.loads(line)
                if "error" in record:
                    return {**result, "cause": str(record["error"])[:200]}
                arrived.append(time.perf_counter())
                records.append(record)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        # Before an answer (no status): the server never took the request; after: lost.
        kind = "lost" if accepted else "unanswered"
        return {**result, "kind": kind, "cause": f"{type(e).__name__}: {e}"}
    if not records or not records[-1].get("finished"):
        return {**result, "kind": "lost", "cause": "stream ended unfinished"}
    stamps = [r["timestamp"] for r in records]
    issued = next(e["timestamp"] for e in records[-1]["lifetime_events"]
                  if e["event_type"] == "issued")
    n = len(records)
    return {**result, "kind": "ok", "tokens": n, "ttft": arrived[0] - start,
            "tpot": (arrived[-1] - arrived[0]) / (n - 1) if n > 1 else 0.0,
            "server_ttft": stamps[0] - issued,
            "server_tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else 0.0}


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                 connector=aiohttp.TCPConnector(limit=0))


async def capacity(url: str, concurrency: int, seconds: float, seed: int) -> float:
    rng = random.Random(seed)
    done, stop = 0, time.perf_counter() + seconds
    async with session() as s:
        async def client():
            nonlocal done
            while time.perf_counter() < stop:
                if (await one_request(s, url, *workload(rng)))["kind"] == "ok":
                    done += 1
        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
    return done / (time.perf_counter() - start)


async def overload(url: str, rate: float, seconds: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    async with session() as s:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            tasks.append(asyncio.create_task(one_request(s, url, *workload(rng))))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


async def server_refusals(base_url: str) -> dict[str, int]:
    async with session() as s, s.get(f"{base_url}/metrics") as response:
        text = await response.text()
    refused = {}
    for line in text.splitlines():
        if line.startswith("dsjax_admission_rejections_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            refused[reason] = int(float(line.rsplit(" ", 1)[1]))
    return refused


def late(results: list[dict], key: str, bound: float) -> int:
    return sum(r["kind"] == "ok" and r[key] > bound for r in results)


def row(label: str, results: list[dict], refused: dict[str, int], args) -> str:
    ok = [r for r in results if r["kind"] == "ok"]
    count = {kind: sum(r["kind"] == kind for r in results)
             for kind in ("refused", "failed", "lost", "unanswered")}
    ttft_bound, tpot_bound = args.slo_multiple * args.ttft_slo, args.slo_multiple * args.tpot_slo
    client_late = sum(r["ttft"] > ttft_bound or r["tpot"] > tpot_bound for r in ok)
    server_late = sum(r["server_ttft"] > ttft_bound or r["server_tpot"] > tpot_bound for r in ok)
    causes = ", ".join(f"{k} {v}" for k, v in sorted(refused.items()) if v) or "none"
    share = (lambda n: f"{n} ({100 * n / len(ok):.2f}%)") if ok else str
    worst = lambda key: max((r[key] for r in ok), default=0.0)  # noqa: E731
    return (f"| {label} | {len(results)} | {len(ok)} | {count['refused']} ({causes}) | "
            f"{count['failed']} / {count['lost']} / {count['unanswered']} | "
            f"{share(client_late)} | {share(server_late)} | "
            f"{late(results, 'ttft', ttft_bound)} / {late(results, 'tpot', tpot_bound)} | "
            f"{worst('ttft'):.2f} / {worst('tpot'):.3f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--ttft-slo", type=float, default=1.0)
    p.add_argument("--tpot-slo", type=float, default=0.05)
    p.add_argument("--slo-multiple", type=float, default=4.0)
    p.add_argument("--overload", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--calibrate-seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--server-args", default="", help="more flags for python -m serving")
    p.add_argument("--only-default", action="store_true",
                   help="skip the run with admission by count only")
    p.add_argument("--out", type=Path, default=Path("overload-results"))
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.out.mkdir(parents=True, exist_ok=True)

    runs = [("default admission", [])]
    if not args.only_default:
        runs.append(("count bound only", ["--max-queue-delay", "inf", "--max-tpot", "inf"]))
    rows = []
    for label, extra in runs:
        port = free_port()
        slug = label.split()[0]
        server = start_server(args, port, extra, args.out / f"server-{slug}.log")
        base = f"http://127.0.0.1:{port}"
        try:
            rate = asyncio.run(capacity(f"{base}/generate", args.concurrency,
                                        args.calibrate_seconds, seed=1))
            before = asyncio.run(server_refusals(base))
            results = asyncio.run(overload(f"{base}/generate", args.overload * rate,
                                           args.seconds, seed=2))
            after = asyncio.run(server_refusals(base))
        finally:
            server.terminate()
            server.wait(timeout=60)
        with (args.out / f"requests-{slug}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        refused = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        rows.append(row(f"{label} (capacity {rate:.1f} req/s, sent at "
                        f"{args.overload * rate:.0f} req/s)", results, refused, args))
    m = f"{args.slo_multiple:g}"
    print(f"TTFT SLO {args.ttft_slo:g} s, TPOT SLO {args.tpot_slo:g} s, bounds {m} x each\n")
    print(f"| server | sent | accepted | refused 503 (by cause, server's count) | failed / lost "
          f"/ unanswered | "
          f"accepted past {m} x an SLO (client clock) | (server clock) | past TTFT / TPOT "
          f"bound (client) | worst TTFT s / TPOT s (client) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
