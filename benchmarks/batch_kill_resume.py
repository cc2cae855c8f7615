"""Kill the batch job at several points, resume it, and compare with an uninterrupted run.

    python benchmarks/batch_kill_resume.py                  # opt-125m (dummy weights), 96 lines
    python benchmarks/batch_kill_resume.py --lines 40 --kills 3

Writes a batch file of greedy /v1/completions requests (with one malformed line in every 16),
runs `python -m serving.run_batch` on it once uninterrupted, then again with SIGKILLs at
--kills points spread over the run (the first during start-up, the others once the checkpoint has
passed the next mark and lines written after it wait for the next commit) and a SIGTERM in the middle, each time
continuing with --resume, and a last --resume to the end. Prints per interruption the lines
the output had when it was stopped and the lines its checkpoint had committed (what the next
--resume keeps), then whether the final output equals the uninterrupted one line for line
(ids and timestamps aside). tests/test_run_batch.py runs the same helpers on a tiny model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def written_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def committed_lines(output: Path, checkpoint_dir: Path | None = None) -> int | None:
    """Lines the output's latest checkpoint holds (its orbax step), None before the first."""
    steps = (checkpoint_dir or output.with_name(output.name + ".ckpt")) / "progress"
    done = [int(p.name) for p in steps.iterdir() if p.name.isdigit()] if steps.is_dir() else []
    return max(done, default=None)


def run_until(command: list[str], stop_when=None, sig=signal.SIGKILL, timeout: float = 600,
              env: dict | None = None) -> tuple[int, str]:
    """Run the command; send `sig` once stop_when() holds (never with None). Returns (exit
    status, stderr)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while stop_when is not None and proc.poll() is None and time.monotonic() < deadline:
        if stop_when():
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err.decode(errors="replace")


def answers(path: Path) -> list[tuple]:
    """(custom_id, status, body without ids and times) per output line."""
    out = []
    for line in path.read_text().splitlines():
        o = json.loads(line)
        body = {k: v for k, v in o["response"]["body"].items() if k not in ("id", "created")}
        out.append((o["custom_id"], o["response"]["status_code"], body))
    return out


def write_batch_file(path: Path, lines: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            if i % 16 == 15:
                f.write('{"custom_id": "broken-%d", "method": "POST", "url": \n' % i)
                continue
            body = {"prompt": f"Request {i}: the capital of France is", "temperature": 0,
                    "ignore_eos": True, "max_tokens": max_tokens + i % 5}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs, the first at start-up")
    ap.add_argument("--window", type=int, default=16,
                    help="the batch job's --window: smaller spreads its progress over the run")
    ap.add_argument("--out", type=Path, default=Path("/tmp/dsjax-kill-resume"))
    ap.add_argument("engine_flags", nargs="*", default=[],
                    help="after --: engine flags (default: --model opt-125m "
                         "--use-dummy-weights --dtype float32)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / "input.jsonl"
    write_batch_file(source, args.lines, args.max_tokens)
    engine = args.engine_flags or ["--model", "opt-125m", "--use-dummy-weights",
                                   "--dtype", "float32"]

    def command(output: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "serving.run_batch", "-i", str(source), "-o",
                str(output), "--no-progress-bar", "--checkpoint-interval", "0.5",
                "--window", str(args.window), *engine, *extra]

    reference, output = args.out / "reference.jsonl", args.out / "resumed.jsonl"
    started = time.monotonic()
    status, err = run_until(command(reference, "--overwrite"))
    assert status == 0, err[-3000:]
    print(f"uninterrupted: {written_lines(reference)} lines in "
          f"{time.monotonic() - started:.0f} s")
    output.unlink(missing_ok=True)     # a fresh start: the first kill may come before any write
    shutil.rmtree(output.with_name(output.name + ".ckpt"), ignore_errors=True)
    rows = []
    run = command(output, "--resume")
    for k in range(args.kills + 1):
        if k == 0:
            stop, sig, what = (lambda: True), signal.SIGKILL, "SIGKILL at start-up"
        elif k == args.kills // 2 + 1:
            mark = (committed_lines(output) or 0) + args.lines // (args.kills + 2)
            stop, sig, what = (lambda m=mark: (committed_lines(output) or 0) >= m), \
                signal.SIGTERM, "SIGTERM mid-run"
        else:
            # Progress is read from the checkpoints, which only this run's commits move (the
            # file still holds the last run's uncommitted lines until this one cuts them).
            mark = (committed_lines(output) or 0) + args.lines // (args.kills + 2)

            def stop(m=mark):
                committed = committed_lines(output) or 0
                return committed >= m and written_lines(output) > committed
            sig, what = signal.SIGKILL, "SIGKILL mid-run"
        status, err = run_until(run, stop, sig)
        rows.append((what, status, written_lines(output), committed_lines(output)))
        print(f"{what}: exit {status}, output had {rows[-1][2]} lines, checkpoint "
              f"{rows[-1][3]} lines")
        run = command(output, "--resume")
    status, err = run_until(run)
    assert status == 0, err[-3000:]
    same = answers(output) == answers(reference)
    print(f"final --resume: exit {status}, {written_lines(output)} lines; "
          f"identical to the uninterrupted run, line for line: {same}")
    custom_ids = [a[0] for a in answers(output)]
    print(f"custom_ids in input order, none missing or repeated: "
          f"{custom_ids == [a[0] for a in answers(reference)]}")


if __name__ == "__main__":
    main()
