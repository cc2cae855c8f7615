"""Engine figures: host overhead per decode step, migration time vs KV bytes, phase overlap.

    python benchmarks/bench_engine.py overhead --model opt-tiny --batch-sizes 1,16,64,256
    python benchmarks/bench_engine.py migration --model opt-125m
    python benchmarks/bench_engine.py overlap --model opt-125m

overhead: decode steps of a running batch; host overhead = step wall time minus the time
  blocked on the device's results (the rest is Python: scheduling, metadata, sampling bookkeeping,
  streaming). Target: < 1 ms per step at batch 256, so the engine never starves a GPU.
migration: KV copy time between instances for each TP pair (device to device).
overlap: prefill and decode steps' time spans; overlapping spans show both phases computing at once.
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
    return Engine(EngineConfig(model=args.model, load_format="dummy", dtype=args.dtype,
                               block_size=16, **kw))


def overhead(args) -> None:
    import numpy as np
    from dsjax import SamplingParams

    print("| batch | full-batch steps | step ms | device wait ms | host overhead ms/step |")
    print("|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        engine = _engine(args, mode="disaggregated", decoding_max_batch_size=b,
                         context_max_batch_size=b, context_max_tokens_per_batch=16 * b,
                         num_blocks=b * (args.steps // 16 + 4) + 16)
        rng = np.random.default_rng(0)
        params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
        prompts = [rng.integers(4, 1000, 16).tolist() for _ in range(b)]
        # warm-up run compiles every bucket this batch will use
        for s in [engine.add_request(p, params) for p in prompts]:
            s.result()
        decode = engine.decode_instances[0]
        decode.step_log = []
        for s in [engine.add_request(p, params) for p in prompts]:
            s.result()
        full = [(t, w) for n, t, w in decode.step_log if n == b]  # steps with the whole batch
        steps = len(full)
        busy, wait = sum(t for t, _ in full), sum(w for _, w in full)
        print(f"| {b} | {steps} | {1e3 * busy / steps:.2f} | {1e3 * wait / steps:.2f} | "
              f"{1e3 * (busy - wait) / steps:.3f} |")
        engine.shutdown()


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
        src, dst = engine.prefill_instances[0].runner, engine.decode_instances[0].runner
        for tokens in [128, 512, 2048]:
            blocks = list(range(tokens // 16))
            migrate(src, blocks, dst, blocks)  # compile
            dst.block_until_ready()
            start = time.perf_counter()
            nbytes = migrate(src, blocks, dst, blocks)
            dst.block_until_ready()
            dt = time.perf_counter() - start
            print(f"| {ctp} | {dtp} | {tokens} | {nbytes / 1e6:.1f} | {1e3 * dt:.2f} | "
                  f"{nbytes / dt / 1e9:.2f} |")
        engine.shutdown()


def overlap(args) -> None:
    """Spans of prefill and decode steps while a stream of requests runs."""
    import numpy as np
    from dsjax import SamplingParams
    import dsjax.engine.worker as instances

    spans = []
    for cls in (instances.PrefillInstance, instances.DecodeInstance):
        original = cls.step

        def timed_step(self, _orig=original):
            start = time.perf_counter()
            did = _orig(self)
            if did:
                spans.append((self.name_, start, time.perf_counter()))
            return did
        cls.step = timed_step
    engine = _engine(args, num_blocks=512)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    streams = []
    for i in range(args.requests):
        streams.append(engine.add_request(rng.integers(4, 1000, 128).tolist(), params))
        time.sleep(0.05)
    for s in streams:
        s.result()
    engine.shutdown()
    t0 = min(s for _, s, _ in spans)
    prefill = [(a - t0, b - t0) for n, a, b in spans if n.startswith("prefill")]
    decode = [(a - t0, b - t0) for n, a, b in spans if n.startswith("decode")]
    both = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in prefill for a2, b2 in decode)
    print(f"prefill steps {len(prefill)} busy {sum(b - a for a, b in prefill):.3f} s; "
          f"decode steps {len(decode)} busy {sum(b - a for a, b in decode):.3f} s; "
          f"both phases busy at once for {both:.3f} s")
    for a, b in prefill[:5]:
        print(f"  prefill step {a:8.3f} -> {b:8.3f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["overhead", "migration", "overlap"])
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    args = p.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8").strip()
    {"overhead": overhead, "migration": migration, "overlap": overlap}[args.what](args)


if __name__ == "__main__":
    main()
