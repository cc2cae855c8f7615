"""Kick the tires: the artifact's whole workflow on a CPU machine in a few minutes.

    python -m serving.kick_the_tires [--out kick-the-tires] [--model opt-125m]

For each system, DistServe (disaggregated: a prefill and a decode instance) and the vLLM-style
baseline (colocated: one instance), it starts `python -m serving` on a dummy-weight model, waits
until /health answers, replays 10 ShareGPT requests per rate with `serving.bench` (prompts and
outputs capped so CPU runs stay short), and stops the server. Then `serving.analysis` draws the
attainment figures. Everything lands under --out: the dataset, the server logs, exp/*.exp
(warmup/ holds the unmeasured compile-warming replay), plots/.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from dsjax.eval.workloads import Dataset, get_dataset, save_dataset
from serving import analysis, bench

# system name in the .exp file names -> the server's --mode, and the devices it occupies
SYSTEMS = {"distserve": ("disaggregated", 2), "vllm": ("colocated", 1)}
READY_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60
WARMUP_RATE = 100.0             # req/s: the warm-up replay sends everything at once


def capped_sharegpt(num: int, max_prompt_len: int, max_output_len: int, seed: int) -> Dataset:
    """`num` ShareGPT requests with prompts of at most max_prompt_len tokens, outputs capped."""
    source = get_dataset("sharegpt")
    short = [r for r in source.reqs if r.prompt_len <= max_prompt_len]
    picked = Dataset(source.name, short).sample(num, seed)
    return Dataset(f"sharegpt-capped-{max_prompt_len}-{max_output_len}",
                   [replace(r, output_len=min(r.output_len, max_output_len)) for r in picked])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, mode: str, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serving", "--model", model, "--use-dummy-weights",
           "--dtype", "float32", "--mode", mode, "--port", str(port)]
    print(f"$ {' '.join(cmd)}  (log: {log_path})", flush=True)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_until_ready(server: subprocess.Popen, port: int, log_path: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was "
                               f"ready: see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server did not answer /health within {READY_TIMEOUT_S} s: "
                       f"see {log_path}")


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGINT)
    try:
        return server.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def run_system(system: str, args, dataset_path: Path, out: Path) -> None:
    mode, _ = SYSTEMS[system]
    port = free_port()
    log_path = out / f"server-{system}.log"
    server = start_server(args.model, mode, port, log_path)
    try:
        print(f"{system}: ready after {wait_until_ready(server, port, log_path):.1f} s", flush=True)
        # One unmeasured replay first: XLA compiles each new batch shape once, and those
        # seconds would otherwise land on the first measured rate.
        runs = {"warmup": [WARMUP_RATE] * args.warmup_passes, "exp": args.rates}
        for result_dir, rates in runs.items():
            if not rates:
                continue
            pairs = "[" + ", ".join(f"({args.num_prompts}, {rate})" for rate in rates) + "]"
            code = bench.main(["--backend", "distserve", "--port", str(port),
                               "--dataset", str(dataset_path), "--num-prompts-req-rates", pairs,
                               "--exp-result-root", str(out), "--exp-result-dir", result_dir,
                               "--exp-result-prefix", system, "--ttft-slo", str(args.ttft_slo),
                               "--tpot-slo", str(args.tpot_slo), "--no-progress"])
            if code != 0:
                raise RuntimeError(f"serving.bench failed against the {system} server "
                                   f"(exit {code})")
    finally:
        code = stop_server(server)
        print(f"{system}: server stopped (exit code {code})", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.kick_the_tires", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="kick-the-tires", help="directory for every output")
    p.add_argument("--model", default="opt-tiny",
                   help="an OPT size name (dummy weights); opt-125m takes about 3x longer")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="request rates (req/s), one run of --num-prompts each")
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--max-output-len", type=int, default=32)
    p.add_argument("--ttft-slo", type=float, default=1.0, help="seconds; CPU-sized")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="seconds; CPU-sized")
    p.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--warmup-passes", type=int, default=1,
                   help="unmeasured replays of the dataset before the measured rates")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = capped_sharegpt(args.num_prompts, args.max_prompt_len, args.max_output_len,
                              args.seed)
    dataset_path = out / "dataset.json"
    save_dataset(dataset, dataset_path)
    mean_in, mean_out = dataset.mean_lengths()
    print(f"dataset: {len(dataset.reqs)} ShareGPT requests, mean lengths {mean_in:.0f} in / "
          f"{mean_out:.0f} out -> {dataset_path}", flush=True)
    for system in args.systems:
        run_system(system, args, dataset_path, out)
    plots = out / "plots"
    analysis.main([str(out / "exp"), "--model", args.model, "--workload", "sharegpt",
                   "--ttft-slo", str(args.ttft_slo), "--tpot-slo", str(args.tpot_slo),
                   *[f"--num-gpus={s}={SYSTEMS[s][1]}" for s in args.systems],
                   "--out", str(plots)])
    failed = {f.name: len(json.loads(f.read_text()))
              for f in sorted((out / "exp").glob("*.failed.json"))}
    if any(failed.values()):
        print(f"\nWARNING: failed requests per run {failed}: see the server logs")
    print(f"\nkick the tires done in {time.monotonic() - started:.0f} s\n"
          f"  dataset:     {dataset_path}\n  server logs: {out}/server-*.log\n"
          f"  results:     {out / 'exp'}/*.exp\n  figures:     {plots}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
