"""Where a warm start's time goes: `python -m serving` under py-spy, its samples sorted into
running warm-up steps, tracing, lowering, loading compiled programs, compiling and the rest.

    pip install py-spy
    python benchmarks/profile_startup.py --model opt-125m

Starts the server once to fill an empty compilation cache (not profiled), then again under
`py-spy record` with that cache, until /health answers. Prints seconds of samples per kind of
work, summed over the threads that did it (the instances warm up on threads of their own, so
the sum can exceed the wall time), and the ready times. py-spy samples a thread only while it
runs (not while it waits for the GIL or a lock), so these are seconds of work, not of waiting.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_startup import free_port, wait_ready  # noqa: E402

# The first kind whose marker appears anywhere in a stack takes the sample.
KINDS = (("loading stored programs (program store)", ("deserialize_and_load",)),
         ("loading compiled programs", ("get_executable_and_time", "decompress_executable")),
         ("compiling", ("backend_compile", "compile_or_get_cached")),
         ("lowering", ("lower_jaxpr", "_cached_lowering", "lower_sharding_computation")),
         ("tracing", ("trace_to_jaxpr", "_infer_params")),
         ("running warm-up steps", ("ArrayImpl._value", "block_until_ready", "device_get")),
         ("imports", ("_find_and_load",)))
IDLE = ("Condition.wait", "wait (threading", "sleep", "select", "_worker (concurrent")
RATE = 200   # samples per second


def kind_of(frames: list[str]) -> str:
    if any(mark in frames[-1] for mark in IDLE):
        return "idle"
    for kind, marks in KINDS:
        if any(mark in f for f in frames for mark in marks):
            return kind
    return "other"


def start(args, cache: str, profile: str | None) -> float:
    port = free_port()
    command = [sys.executable, "-m", "serving", "--model", args.model, "--use-dummy-weights",
               "--port", str(port), "--no-log-status", "--compilation-cache-dir", cache]
    if profile:
        command = ["py-spy", "record", "--threads", "-r", str(RATE), "--format",
                   "raw", "-o", profile, "--", *command]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        return wait_ready(port, server, time.perf_counter())
    finally:   # Ctrl-C to the group: the server stops, py-spy writes its file
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    args = p.parse_args(argv)
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        cold = start(args, tmp, None)
        profile = str(Path(tmp) / "stacks.txt")
        warm = start(args, tmp, profile)
        seconds = collections.Counter()
        for line in Path(profile).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            seconds[kind_of(stack.split(";"))] += int(count) / RATE
    print(f"{args.model}: ready {cold:.1f} s cold, {warm:.1f} s warm (under py-spy)\n")
    print("| work (warm start, all threads) | seconds of samples |")
    print("|---|---|")
    for kind, s in seconds.most_common():
        if kind != "idle":
            print(f"| {kind} | {s:.1f} |")


if __name__ == "__main__":
    main()
