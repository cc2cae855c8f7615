"""Where the decode thread's host time goes, from a sampling profiler (py-spy), not timers.

    pip install py-spy
    python benchmarks/profile_decode_loop.py --batch 256 --steps 96

Runs `bench_engine.py threads` (synchronous decode steps of a full batch, opt-tiny, dummy
weights) under `py-spy record`, keeps the decode thread's samples inside `_decode_step` that
are neither the wait for the device's results nor a compile (the first run compiles every
shape), and prints the flame graph's top frames: by self time (per line) and by inclusive time
(per function), each as samples and as a share of the host samples. py-spy samples a thread
only while it runs, so time spent waiting for the GIL does not show here. `--raw FILE` keeps py-spy's collapsed stacks (feed
them to flamegraph.pl for the picture).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICE_WAIT = ("ArrayImpl._value", "block_until_ready")
COMPILING = ("_infer_params", "trace_to_jaxpr", "lower_jaxpr", "compil", "_cached_lowering",
             "serialize_executable", "program_store")   # (the store writes what compiled)


def frame_name(frame: str) -> str:
    """`function (path/to/file.py:line)` -> `function (file.py:line)`."""
    return re.sub(r"\s*\((?:[^()]*/)?([^/()]+\.py):(\d+)\)", r" (\1:\2)", frame)


def host_stacks(raw: str, thread: str):
    """(frames from _decode_step down, samples) of the thread's host work."""
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or thread not in frames[0]:
            continue
        at = next((i for i, f in enumerate(frames) if "_decode_step" in f), None)
        if at is None or any(w in f for f in frames for w in DEVICE_WAIT + COMPILING):
            continue
        yield [frame_name(f) for f in frames[at:]], int(count)


def summarize(raw: str, thread: str, top: int) -> None:
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for frames, n in host_stacks(raw, thread):
        total += n
        own[frames[-1]] += n
        for f in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            inclusive[f] += n
    print(f"{total} host samples of {thread} inside _decode_step\n")
    for title, counts in (("self", own), ("inclusive", inclusive)):
        print(f"| frame ({title}) | samples | share |")
        print("|---|---|---|")
        for f, n in counts.most_common(top):
            print(f"| `{f}` | {n} | {100 * n / max(total, 1):.1f}% |")
        print()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--raw", help="keep py-spy's collapsed stacks here")
    args = p.parse_args(argv)
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    bench = Path(__file__).resolve().parent / "bench_engine.py"
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = args.raw or str(Path(tmp) / "stacks.txt")
        subprocess.run(["py-spy", "record", "--threads", "-r", str(args.rate), "--format", "raw",
                        "-o", raw_path, "--", sys.executable, str(bench), "threads",
                        "--batch-sizes", str(args.batch), "--steps", str(args.steps)],
                       check=True, stdout=subprocess.DEVNULL)
        summarize(Path(raw_path).read_text(), "dsjax-decode0", args.top)


if __name__ == "__main__":
    main()
