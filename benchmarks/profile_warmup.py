"""Where an engine's warm-up time goes, phase by phase: the runner's step and page calls and
the warm-up functions wrapped in timers, for a cold start (empty compilation cache) and then a
warm one (the same cache, so the program store loads what the cold start stored).

    python benchmarks/profile_warmup.py --model opt-125m

Builds the engine in-process with the launcher's warm-up (`python -m serving`'s defaults: every
length and batch), no HTTP server. Prints the ready time and, per timed function, its seconds
summed over the instances' threads (they warm up side by side, so the sum can exceed the wall
time) and its calls. Timers nest: warm_up_runner includes the runner calls it makes. Then the
programs made ready (compiled, or loaded from the program store) by kind, with the seconds
their making took, and the process's CPU seconds to ready (both cores compile). Each start runs
in a subprocess of its own, so the second sees only what the first left on disk.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RUNNER_CALLS = ("dispatch_decode", "prefill", "prefill_cached", "chunked", "insert_pages",
                "gather_pages", "warm_token_selection")
WARMUP_CALLS = ("warm_up_runner", "warm_up_fixed_programs", "warm_up_pulls",
                "measure_prefill_budget")


def one_start(model: str, cache: str) -> None:
    """Start an engine on `cache` and print its phases (the child's body)."""
    import collections
    import functools
    import time

    import jax
    jax.config.update("jax_compilation_cache_dir", cache)
    from dsjax.config import EngineConfig
    from dsjax.engine.core import Engine
    import os

    from dsjax.executor import runner, warmup
    from serving.launcher_config import LAUNCHER_DEFAULTS

    seconds, calls = collections.Counter(), collections.Counter()

    def timed(owner, name):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started
                calls[name] += 1
        setattr(owner, name, run)

    for name in RUNNER_CALLS:
        timed(runner.ModelRunner, name)
    for name in WARMUP_CALLS:   # (build_worker imports them from the module when it runs)
        timed(warmup, name)
    made, made_s = collections.Counter(), collections.Counter()
    make_ready = runner.Stage._make_ready

    def counted(stage, key, make, args):   # key[0]: "forward", "sample", "select", ...
        started = time.perf_counter()
        try:
            return make_ready(stage, key, make, args)
        finally:
            made[key[0]] += 1
            made_s[key[0]] += time.perf_counter() - started
    runner.Stage._make_ready = counted
    cpu = os.times()
    settings = {k: v for k, v in LAUNCHER_DEFAULTS.items() if k != "log_status"}
    started = time.perf_counter()
    engine = Engine(EngineConfig(model=model, load_format="dummy", **settings))
    now = os.times()
    print(f"ready in {time.perf_counter() - started:.1f} s, process CPU "
          f"{now.user + now.system - cpu.user - cpu.system:.1f} s")
    engine.shutdown()
    print("| function | seconds (all threads) | calls |")
    print("|---|---|---|")
    for name, s in seconds.most_common():
        print(f"| {name} | {s:.1f} | {calls[name]} |")
    print(f"\n| program kind | made ready | seconds (all threads) |\n|---|---|---|")
    for kind, n in made.most_common():
        print(f"| {kind} | {n} | {made_s[kind]:.1f} |")
    print(f"| all | {sum(made.values())} | {sum(made_s.values()):.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--child-cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_cache:
        one_start(args.model, args.child_cache)
        return
    env = dict(os.environ)
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=8").strip()
    with tempfile.TemporaryDirectory(prefix="dsjax-warmup-cache-") as cache:
        for label in ("cold", "warm"):
            print(f"== {label} start")
            sys.stdout.flush()
            subprocess.run([sys.executable, __file__, "--model", args.model,
                            "--child-cache", cache], env=env, check=True)


if __name__ == "__main__":
    main()
