"""Engine figures: host overhead per decode step, migration time vs KV bytes, interference.

    python benchmarks/bench_engine.py overhead --model opt-tiny --batch-sizes 1,16,64,256
    python benchmarks/bench_engine.py phases --batch-sizes 256 --steps 96
    python benchmarks/bench_engine.py threads --batch-sizes 1,64,256 --steps 64
    python benchmarks/bench_engine.py gc --batch-sizes 64,256 --steps 64
    python benchmarks/bench_engine.py migration --model opt-125m
    python benchmarks/bench_engine.py interference --model opt-125m --backends uni,mp
    python benchmarks/bench_engine.py landing --prompt-len 128 --steps 16

overhead: decode steps of a running batch; host overhead = step wall time minus the time
  blocked on the device's results (the rest is Python: scheduling, metadata, sampling bookkeeping,
  streaming). Target: < 1 ms per step at batch 256, so the engine never starves a GPU.
phases: where a synchronous decode step's host time goes, phase by phase (at the largest batch);
  with --async-scheduling, an overlapped step's (the default engine's).
threads: CPU time per synchronous step of the decode thread, and of the router per report.
gc: Python's garbage collections during synchronous decode steps: the start-up heap handed
  back to the collector, frozen at CPython's thresholds, and frozen as the engine sets it.
migration: KV copy time between instances for each TP pair (device to device).
interference: a decode instance's time per output token alone, and while the prefill instance
  runs long prompts, for each executor backend (timed at the caller from token timestamps, so
  instances in other processes are measured the same way). Near 1 means the phases do not
  interfere; on a CPU only the "mp" backend gives each instance its own cores.
landing: what a pulled request's arrival costs the decode instance's step loop (its `_land`:
  writing the arrived pages, starting the request), per request, in a "uni" engine taking a
  new prompt every 20 ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _engine(args, **kw):
    from dsjax.config import EngineConfig
    from dsjax.engine.core import Engine
    return Engine(EngineConfig(**{**dict(model=args.model, load_format="dummy", dtype=args.dtype,
                                         block_size=16), **kw}))


def _full_batches(args, b: int, async_scheduling: bool, **config):
    """An engine whose decode instance runs batches of b, after one batch of b requests that
    compiled every bucket they use, and a function that runs another batch and waits for it
    (new prompts each time: the same ones would hit the prefix cache and take other shapes).
    `config`: more EngineConfig fields."""
    import numpy as np
    from dsjax import SamplingParams
    engine = _engine(args, mode="disaggregated", decoding_max_batch_size=b,
                     context_max_batch_size=b, context_max_tokens_per_batch=16 * b,
                     num_blocks=b * (args.steps // 16 + 4) + 16,
                     async_scheduling=async_scheduling, **config)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)

    def run_batch() -> None:
        for s in [engine.add_request(rng.integers(4, 1000, 16).tolist(), params)
                  for _ in range(b)]:
            s.result()
    run_batch()
    return engine, run_batch


def overhead(args) -> None:
    """Decode step period and host time per step, with async scheduling off and on.

    Off: a step's host overhead is its wall time minus the time it blocked on the device.
    On: step N+1 is dispatched before step N is read, so host work hides behind device work;
    the period between steps is what a request feels, and its excess over the device time of
    the synchronous run is the host time left showing."""
    import numpy as np

    print("| batch | sync step ms | device ms | host overhead ms (sync, mean) | "
          "host overhead ms (sync, median) | async step ms | host time showing ms (async) |")
    print("|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        row = [str(b)]
        for overlap in (False, True):
            engine, run_batch = _full_batches(args, b, overlap)
            decode = engine.local_worker("decode0")
            decode.step_log = []
            run_batch()
            full = [(t, w, end) for n, t, w, end in decode.step_log if n == b]  # whole batch
            engine.shutdown()
            if not overlap:
                step = float(np.mean([t for t, _, _ in full]))
                device = float(np.mean([w for _, w, _ in full]))
                # The mean carries the rare slow step (a collection, the other threads taking
                # the GIL); the median is the typical step's.
                typical = float(np.median([t - w for t, w, _ in full]))
                row += [f"{1e3 * step:.2f}", f"{1e3 * device:.2f}", f"{1e3 * (step - device):.3f}",
                        f"{1e3 * typical:.3f}"]
            else:
                # Steps overlap: one's entry spans its dispatch to its read, so the period is
                # the gap between consecutive reads.
                period = float(np.median(np.diff([end for _, _, end in full])))
                row += [f"{1e3 * period:.2f}", f"{1e3 * max(0.0, period - device):.3f}"]
        print("| " + " | ".join(row) + " |")


def phases(args) -> None:
    """Where a decode step's host time goes, at the largest of --batch-sizes: each phase of the
    decode thread timed by a wrapper around the worker's and runner's methods (per step: mean;
    per call of the two jitted functions: median and the slowest). Synchronous steps unless
    --async-scheduling (then a step's inputs may take the previous step's samples on the
    device: `_tokens_from` where that is a program of its own)."""
    import collections

    import numpy as np
    from dsjax import SamplingParams

    b = max(int(x) for x in args.batch_sizes.split(","))
    engine = _engine(args, mode="disaggregated", decoding_max_batch_size=b,
                     context_max_batch_size=b, context_max_tokens_per_batch=16 * b,
                     num_blocks=b * (args.steps // 16 + 4) + 16,
                     async_scheduling=args.async_scheduling,
                     warmup_max_prompt_len=16, warmup_max_context_len=16 + args.steps + 1,
                     warmup_max_decode_batch=b, warmup_max_prefill_batch=8)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    for s in [engine.add_request(rng.integers(4, 1000, 16).tolist(), params) for _ in range(b)]:
        s.result()
    worker = engine.local_worker("decode0")
    total, calls, each = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    cpu = collections.Counter()

    def timed(fn, label):
        def run(*a, **k):
            start, cpu_start = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                took = time.perf_counter() - start
                total[label] += took
                cpu[label] += time.thread_time() - cpu_start
                calls[label] += 1
                each[label].append(took)
        return run

    for obj, names in ((worker.scheduler, ["schedule"]),
                       (getattr(worker, "persistent", None), ["next_step"]),
                       (worker, ["_decode_step", "_decode_row", "_emit_all", "_record", "_flush"]),
                       (worker.runner, ["dispatch_decode", "_inputs", "_pipeline", "_fetch",
                                        "_tokens_from"])):
        for name in names:
            if hasattr(obj, name):   # (an older tree may lack one)
                setattr(obj, name, timed(getattr(obj, name), name))
    stage = worker.runner.stages[-1]
    for name in ("_forward", "_sampler", "_decode_and_sample"):   # their jitted functions
        if not hasattr(stage, name):
            continue
        get = getattr(stage, name)
        setattr(stage, name, lambda *a, _get=get, _n=name: timed(_get(*a), f"jit {_n}"))
    for s in [engine.add_request(rng.integers(4, 1000, 16).tolist(), params) for _ in range(b)]:
        s.result()
    engine.shutdown()
    steps = calls["_decode_step"]
    print(f"batch {b}, {steps} {'overlapped' if args.async_scheduling else 'synchronous'} "
          "steps (the first run's steps compiled every shape)\n")
    print("| phase | ms per step (mean) | thread CPU ms per step (mean) | calls per step | "
          "median ms per call | slowest ms |")
    print("|---|---|---|---|---|---|")
    for label, seconds in total.most_common():
        print(f"| {label} | {1e3 * seconds / steps:.3f} | {1e3 * cpu[label] / steps:.3f} | "
              f"{calls[label] / steps:.1f} | {1e3 * float(np.median(each[label])):.3f} | "
              f"{1e3 * max(each[label]):.1f} |")


def threads(args) -> None:
    """CPU seconds, not wall time, of the two threads a synchronous decode step involves: the
    decode thread per step (its host work; the device's compute runs on XLA's own threads)
    and the router per report of a whole batch (tokens into streams). In one process both
    need the GIL: the step's host wall time is about the first plus whatever of the second
    overlaps it."""
    import numpy as np

    print("| batch | decode thread CPU ms / step | router CPU ms / report | step wall - device "
          "wait ms |")
    print("|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        engine, run_batch = _full_batches(args, b, False)
        worker = engine.local_worker("decode0")
        steps, reports = [], []
        decode_step, on_report = worker._decode_step, engine._on_report

        def timed_step():
            wall, cpu = time.perf_counter(), time.thread_time()
            did = decode_step()
            steps.append((len(worker._in_step), time.thread_time() - cpu,
                          time.perf_counter() - wall - worker.runner.last_wait_s))
            return did

        def timed_report(report):
            cpu = time.thread_time()
            on_report(report)
            # Tokens in the report: columns per step, or (older trees) one object each.
            reports.append((sum(len(getattr(t, "request_ids", (t,))) for t in report.tokens),
                            time.thread_time() - cpu))

        worker._decode_step, engine._on_report = timed_step, timed_report
        run_batch()
        engine.shutdown()
        full = [(cpu, host) for n, cpu, host in steps if n == b]
        routed = [cpu for n, cpu in reports if n == b]
        print(f"| {b} | {1e3 * np.median([c for c, _ in full]):.2f} | "
              f"{1e3 * np.median(routed):.2f} | {1e3 * np.median([h for _, h in full]):.2f} |")


PYTHON_GC_THRESHOLDS = (700, 10, 10)   # CPython's own


def collections_during_steps(args) -> None:
    """Decode steps of full batches (synchronous), twice per engine, with the collector's
    pauses timed per thread by gc.callbacks: the decode thread's total per decode step (of
    any size) and its longest, the longest on any thread, and the full steps' host time (wall
    minus the device wait) at the median, P99 and worst. Three engines: "thawed" hands the
    start-up heap back to the collector once the engine is ready, at CPython's own thresholds
    (every full collection walks it again, as before dsjax.engine.startup_heap); "frozen, gen 0
    at 700" keeps the heap frozen at CPython's thresholds; the default freezes it and collects
    the youngest generation every startup_heap.YOUNG_THRESHOLD allocations."""
    import gc
    import threading

    import numpy as np

    print("| batch | start-up heap | steps | full collections (all threads) | GC ms / step, all "
          "threads | decode thread GC "
          "ms / step | longest decode-thread pause ms | longest pause, any thread ms | host ms "
          "median | host ms P99 | host ms worst |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    frozen_counts = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        for heap in ("thawed", "frozen, gen 0 at 700", "frozen (default)"):
            # Warm-up covers the run, as a server's does: no compile leaves its objects
            # outside the frozen heap.
            engine, run_batch = _full_batches(
                args, b, False, warmup_max_prompt_len=16,
                warmup_max_context_len=16 + args.steps + 1, warmup_max_prefill_batch=b,
                warmup_max_decode_batch=b)
            if heap == "thawed":   # as before: the whole heap collected
                gc.unfreeze()
            if heap != "frozen (default)":
                gc.set_threshold(*PYTHON_GC_THRESHOLDS)
            if heap == "frozen (default)":
                frozen_counts.append(gc.get_freeze_count())
            decode = engine.local_worker("decode0")
            decode.step_log = []
            pauses, began = [], {}

            def timed(phase, info):
                thread = threading.get_ident()
                if phase == "start":
                    began[thread] = time.perf_counter()
                elif thread in began:
                    pauses.append((threading.current_thread().name, info["generation"],
                                   time.perf_counter() - began.pop(thread)))
            gc.callbacks.append(timed)
            try:
                run_batch()
                run_batch()
            finally:
                gc.callbacks.remove(timed)
            engine.shutdown()
            host = [t - w for n, t, w, _ in decode.step_log if n == b]
            if not host:
                print(f"| {b} | {heap} | no full batch ran |")
                continue
            mine = [s for name, _, s in pauses if name == "dsjax-decode0"]
            steps = len(decode.step_log)   # every decode step, full or not, may collect
            print(f"| {b} | {heap} | {len(host)} | "
                  f"{sum(g == 2 for _, g, _ in pauses)} | "
                  f"{1e3 * sum(p for _, _, p in pauses) / steps:.2f} | "
                  f"{1e3 * sum(mine) / steps:.2f} | "
                  f"{1e3 * max(mine, default=0):.1f} | "
                  f"{1e3 * max((s for _, _, s in pauses), default=0):.1f} | "
                  f"{1e3 * np.median(host):.2f} | {1e3 * np.percentile(host, 99):.2f} | "
                  f"{1e3 * max(host):.1f} |")
    print(f"\nobjects frozen at start-up, per default engine: {frozen_counts}")


def migration(args) -> None:
    import jax
    from dsjax.executor.kv_migration import migrate

    pairs = [(1, 1), (1, 2), (2, 1), (2, 2)]
    if len(jax.devices()) < 4:
        pairs = [(1, 1)]
    print("| prefill TP | decode TP | tokens | KV MB | ms | GB/s |")
    print("|---|---|---|---|---|---|")
    for ctp, dtp in pairs:
        engine = _engine(args, context_tensor_parallel_size=ctp,
                         decoding_tensor_parallel_size=dtp, num_blocks=260)
        src = engine.local_worker("prefill0").runner
        dst = engine.local_worker("decode0").runner

        def wait():
            jax.block_until_ready([(s.pool.k, s.pool.v) for s in dst.stages])
        for tokens in [128, 512, 2048]:
            blocks = list(range(tokens // 16))
            migrate(src, blocks, dst, blocks)  # compile
            wait()
            start = time.perf_counter()
            nbytes = migrate(src, blocks, dst, blocks)
            wait()
            dt = time.perf_counter() - start
            print(f"| {ctp} | {dtp} | {tokens} | {nbytes / 1e6:.1f} | {1e3 * dt:.2f} | "
                  f"{nbytes / dt / 1e9:.2f} |")
        engine.shutdown()


def interference(args) -> None:
    """Decode time per output token alone vs while long prompts keep the prefill instance busy."""
    import numpy as np
    from dsjax import SamplingParams

    rng = np.random.default_rng(0)
    print("| backend | TPOT alone ms | TPOT during prefill ms | ratio | prefill steps overlapped |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        engine = _engine(args, distributed_executor_backend=backend, num_blocks=512,
                         context_max_tokens_per_batch=args.prompt_len,
                         warmup_max_prompt_len=args.prompt_len,
                         warmup_max_context_len=args.decode_tokens + 64,
                         warmup_max_prefill_batch=1, warmup_max_decode_batch=8)
        decode = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
        long = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

        def gaps(out, spans=None):
            """Gaps between consecutive tokens, split by whether a prefill step overlapped."""
            t = out.token_timestamps
            pairs = list(zip(t[1:-1], t[2:]))   # skip the first decode step (a migration)
            hit = [any(a < e and s < b for s, e in spans or []) for a, b in pairs]
            return ([b - a for (a, b), h in zip(pairs, hit) if h],
                    [b - a for (a, b), h in zip(pairs, hit) if not h])

        alone = engine.add_request(rng.integers(4, 1000, 16).tolist(), decode).result()
        _, quiet = gaps(alone)
        finals = []
        engine.add_request(rng.integers(4, 1000, 16).tolist(), decode, stream=False,
                           on_output=finals.append)
        spans = []
        while not finals:   # keep the prefill instance busy until the decode finishes
            out = engine.add_request(rng.integers(4, 1000, args.prompt_len).tolist(),
                                     long).result()
            ev = {e["event_type"]: e["timestamp"] for e in out.lifetime_events}
            spans.append((ev["context_begin"], ev["context_end"]))
        during, _ = gaps(finals[0], spans)
        a, b = 1e3 * float(np.median(quiet)), 1e3 * float(np.median(during)) if during else 0.0
        print(f"| {backend} | {a:.1f} | {b:.1f} | {b / a:.2f} | {len(spans)} |")
        engine.shutdown()


def landing(args) -> None:
    import numpy as np
    from dsjax import SamplingParams

    engine = _engine(args, mode="disaggregated", distributed_executor_backend="uni",
                     num_blocks=2048)
    worker = engine.local_worker("decode0")
    land, took = worker._land, []

    def timed_land(*a, **k):
        start = time.perf_counter()
        try:
            return land(*a, **k)
        finally:
            took.append(time.perf_counter() - start)
    worker._land = timed_land
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    print("| round | requests | step-loop ms per landing (median) | P90 | max |")
    print("|---|---|---|---|---|")
    for round_ in ("first (compiles)", "second", "third"):
        took.clear()
        streams = []
        for _ in range(64):
            streams.append(engine.add_request(rng.integers(4, 1000, args.prompt_len).tolist(),
                                              params))
            time.sleep(0.02)
        for s in streams:
            s.result()
        ms = 1e3 * np.array(took)
        print(f"| {round_} | {len(ms)} | {np.median(ms):.3f} | {np.percentile(ms, 90):.3f} | "
              f"{ms.max():.1f} |")
    engine.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["overhead", "phases", "threads", "gc", "migration",
                                    "interference", "landing"])
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--backends", default="uni,mp")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--async-scheduling", action="store_true",
                   help="phases: overlapped steps, as the engine runs by default")
    args = p.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8").strip()
    {"overhead": overhead, "phases": phases, "threads": threads,
     "gc": collections_during_steps, "migration": migration,
     "interference": interference, "landing": landing}[args.what](args)


if __name__ == "__main__":
    main()
