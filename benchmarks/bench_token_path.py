"""Host time of a step's tokens on their way out, warm, without a model: an instance recording
them, and the router delivering them into streamed requests.

    python benchmarks/bench_token_path.py --rows 256 --streams 64 --tokens 2000

record: a decode instance recording one token each for --rows plain sequences (no logprobs,
  no stop strings; `InstanceWorker._record`, or `_emit_all` on older trees), median ms per
  call.
deliver: `Engine._on_report` on a bare engine (no instance runs) for --streams streamed
  requests, one report per step of one token each, for --tokens steps; median ms per report
  over 100-step windows at growing output lengths (whether delivery grows with the output).

Both are loops in one process on warm caches: inside the engine, after a device step, the
same work takes 2-3x longer (docs/benchmarks.md, run 10). Works on trees from before the
token columns (TokenUpdate per token), for before/after runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import timed  # noqa: E402


def _report(messages, rids, step: int):
    """One step's tokens for `rids`, in the tree's message format."""
    n, now = len(rids), time.perf_counter()
    if hasattr(messages, "StepTokens"):
        tokens = (messages.StepTokens(rids, (0,) * n, (step,) * n, (-0.5,) * n, None, {}, now),)
    else:
        tokens = tuple(messages.TokenUpdate(r, 0, step, -0.5, None, now, None) for r in rids)
    return messages.Report("bench", tokens)


def record(rows: int, calls: int = 400) -> float:
    from dsjax import SamplingParams
    from dsjax.engine.messages import RequestSpec
    from dsjax.engine.request import Request
    from dsjax.engine.worker import InstanceWorker
    worker = object.__new__(InstanceWorker)   # the recording only: no runner, no loop
    worker.tokenizer, worker.tokens_out, worker.requests = None, 0, {}
    worker._reset_report()
    params = SamplingParams(temperature=0, max_tokens=1 << 30, ignore_eos=True)
    requests = [Request(RequestSpec(f"r{i}", (1, 2, 3), params, 0), 2) for i in range(rows)]
    results = [(5, -0.5, None, None, None)] * rows
    tokens, logprobs = [5] * rows, [-0.5] * rows
    # A decode step's own path: columns where the tree has it, else (request, sample) pairs.
    if hasattr(worker, "_record"):
        run = lambda: worker._record(requests, tokens, logprobs)  # noqa: E731
    else:
        run = lambda: worker._emit_all(zip(requests, results))  # noqa: E731

    def step():   # (the report's reset, a few list allocations, is timed with it)
        run()
        worker._reset_report()
    return 1e3 * timed(step, warmup=5, iters=calls)


def deliver(streams: int, tokens: int) -> list[tuple[int, float]]:
    from dsjax import SamplingParams
    from dsjax.engine import core, messages
    from dsjax.engine.delivery import TrackedRequest
    engine = object.__new__(core.Engine)   # the router's state only: no instances
    engine.instances = {"bench": core._Instance("bench", "decode", None)}
    engine._tracked = {}
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    for i in range(streams):
        tracked = TrackedRequest(f"r{i}", None, [1, 2], params, lambda output: None, True,
                                 lambda: None, None)
        tracked.parts[f"r{i}"] = None
        engine._tracked[f"r{i}"] = tracked
    rids = tuple(f"r{i}" for i in range(streams))
    took = []
    for step in range(tokens):
        report = _report(messages, rids, step)
        start = time.perf_counter()
        engine._on_report(report)
        took.append(time.perf_counter() - start)
    windows = sorted({0, tokens // 4, tokens // 2, max(0, tokens - 100)})
    return [(w, 1e3 * float(np.median(took[w:w + 100]))) for w in windows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2000)
    args = p.parse_args(argv)
    print(f"record: {args.rows} plain rows, {record(args.rows):.3f} ms per step (median)")
    print(f"\n| output tokens so far | deliver ms per report of {args.streams} streams |")
    print("|---|---|")
    for at, ms in deliver(args.streams, args.tokens):
        print(f"| {at}-{at + 100} | {ms:.3f} |")


if __name__ == "__main__":
    main()
