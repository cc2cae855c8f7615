"""Load client: replays a dataset at Poisson (gamma) arrivals and writes DistServe `.exp` files.

    python -m serving.bench --backend distserve --dataset sharegpt \
        --num-prompts-req-rates "[(100, 1), (200, 2.0)]" --exp-result-dir opt-13b-sharegpt

Flag names follow DistServe's 2-benchmark-serving.py. Each (num_prompts, rate) pair writes
$EXP_RESULT_ROOT/<exp-result-dir>/<prefix>-<num_prompts>-<rate>.exp, the rate printed as written
in the list (so "(10, 1)" gives "-10-1.exp" and "(10, 1.0)" gives "-10-1.0.exp", as in the artifact).
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import aiohttp
from tqdm import tqdm

from dsjax.eval.arrivals import arrival_offsets
from dsjax.eval.workloads import TestRequest, get_dataset
from dsjax.eval.results import (FailedRequest, RequestResult, format_summary, save_exp, save_failures,
                           summarize)
from serving.backends import DEFAULT_PORTS, REQUEST_FUNCS, BackendOptions, fetch_model_name

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)


async def benchmark(backend: str, base_url: str, requests: Sequence[TestRequest], rate: float,
                    cv: float = 1.0, seed: int = 0, options: BackendOptions = BackendOptions(),
                    progress: bool = True) -> tuple[list[RequestResult], list[FailedRequest]]:
    """Send `requests` at their arrival times; return finished results and failures (send order)."""
    if backend not in REQUEST_FUNCS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {sorted(REQUEST_FUNCS)}")
    request_func = REQUEST_FUNCS[backend]
    offsets = arrival_offsets(len(requests), rate, cv, seed)
    # No connection cap: a pooled limit would queue requests in the client and inflate TTFT.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT, connector=connector) as session:
        if backend == "openai" and not options.model:
            options = BackendOptions(await fetch_model_name(session, base_url, options), options.api_key)
        bar = tqdm(total=len(requests), disable=not progress, desc=f"{backend} @ {rate} req/s")

        async def send(req: TestRequest, at: float, t0: float):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            outcome = await request_func(session, base_url, req, options)
            bar.update(1)
            return outcome

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(send(r, at, t0) for r, at in zip(requests, offsets)))
        bar.close()
    results = [o for o in outcomes if isinstance(o, RequestResult)]
    failures = [o for o in outcomes if isinstance(o, FailedRequest)]
    return results, failures


def run_benchmark(backend: str, base_url: str, requests: Sequence[TestRequest], rate: float,
                  cv: float = 1.0, seed: int = 0, model: str | None = None,
                  api_key: str | None = None, exp_path: str | os.PathLike | None = None,
                  progress: bool = True) -> tuple[list[RequestResult], list[FailedRequest]]:
    """Synchronous entry point; with `exp_path`, also writes the .exp file (and failures beside it)."""
    results, failures = asyncio.run(benchmark(backend, base_url.rstrip("/"), requests, rate, cv,
                                              seed, BackendOptions(model, api_key), progress))
    if exp_path is not None:
        save_exp(results, exp_path)
        save_failures(failures, exp_path)
    return results, failures


def parse_pairs(text: str) -> list[tuple[int, float]]:
    """"[(10, 1.0), (100, 2)]" -> [(10, 1.0), (100, 2)], keeping each rate's type for file names."""
    try:
        pairs = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"--num-prompts-req-rates {text!r} is not a Python list of "
                         f"(num_prompts, rate) tuples, e.g. \"[(10, 1.0), (100, 2.0)]\"") from e
    if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], tuple):
        pairs = [pairs]
    if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise ValueError(f"--num-prompts-req-rates {text!r}: every item must be (num_prompts, rate)")
    return [(int(n), r) for n, r in pairs]


def exp_file_name(prefix: str, num_prompts: int, rate: float) -> str:
    return f"{prefix}-{num_prompts}-{rate}.exp"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=sorted(REQUEST_FUNCS), default="distserve")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=None,
                   help="default: 8400 for distserve, 8100 for openai (the artifact's vLLM port)")
    p.add_argument("--dataset", required=True,
                   help="a dataset file (ours or DistServe's .ds), or sharegpt / humaneval")
    p.add_argument("--num-prompts-req-rates", required=True,
                   help='list of (num_prompts, request rate) pairs, e.g. "[(10, 1.0), (100, 2.0)]"')
    p.add_argument("--request-cv", "--cv", dest="cv", type=float, default=1.0,
                   help="coefficient of variation of the arrival gaps (1 = Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exp-result-root", default=None, help="default: $EXP_RESULT_ROOT")
    p.add_argument("--exp-result-dir", required=True)
    p.add_argument("--exp-result-prefix", default=None, help="file name prefix (default: backend)")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds, for the summary")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds, for the summary")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--model", default=None, help="openai: model name (default: from /v1/models)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.exp_result_root or os.environ.get("EXP_RESULT_ROOT")
    if not root:
        print("error: set EXP_RESULT_ROOT or pass --exp-result-root", file=sys.stderr)
        return 2
    pairs = parse_pairs(args.num_prompts_req_rates)
    port = args.port or DEFAULT_PORTS[args.backend]
    base_url = f"http://{args.host}:{port}"
    dataset = get_dataset(args.dataset)
    print(f"dataset {dataset.name}: {len(dataset.reqs)} requests")
    out_dir = Path(root) / args.exp_result_dir
    prefix = args.exp_result_prefix or args.backend
    for num_prompts, rate in pairs:
        print(f"=== {num_prompts} prompts at {rate} req/s -> {base_url}")
        requests = dataset.sample(num_prompts, args.seed)
        exp_path = out_dir / exp_file_name(prefix, num_prompts, rate)
        started = time.perf_counter()
        results, failures = run_benchmark(args.backend, base_url, requests, float(rate), args.cv,
                                          args.seed, args.model, args.api_key, exp_path,
                                          progress=not args.no_progress)
        elapsed = time.perf_counter() - started
        print(f"wrote {exp_path} in {elapsed:.1f} s "
              f"({len(results) / max(elapsed, 1e-9):.2f} finished req/s)")
        for failure in failures[:3]:
            print(f"  failed: {failure.error}")
        print(format_summary(summarize(results, args.ttft_slo, args.tpot_slo, len(failures))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
