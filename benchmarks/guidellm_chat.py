"""guidellm's default benchmark (a sweep over /v1/chat/completions) against `python -m serving`.

    python benchmarks/guidellm_chat.py                 # opt-tiny, dummy weights, 20 s per stage
    python benchmarks/guidellm_chat.py --seconds 10 --model opt-125m

What it does (the venv and tokenizer are reused from --cache-dir):
1. Installs guidellm (GUIDELLM_VERSION) into its own venv, <cache>/guidellm-<version>.
2. Writes a Hugging Face tokenizer directory equal to dsjax's built-in OPT tokenizer, with a
   plain chat template (OPT has none), so the server and guidellm count the same tokens.
3. Starts `python -m serving` on dummy weights with that tokenizer, waits for it, and runs
   `guidellm run` with its default profile (sweep: synchronous, throughput, then constant rates
   between), synthetic prompts of --prompt-tokens and --output-tokens, --seconds per stage.
4. Prints one markdown table, a line per stage: requests that succeeded, errored and were
   still running at the stage's end, requests/s, output tokens/s, median TTFT and ITL.
   guidellm's JSON, its console log and the server log stay in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.vs_vllm import REPO, Server, free_port, venv_bin  # noqa: E402

GUIDELLM_VERSION = "0.8.1"
# OPT ships no chat template; this one is the shape the tests use (role: content lines).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def log(msg: str) -> None:
    print(f"[guidellm_chat {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def install_guidellm(venv: Path, pip_args: list[str]) -> None:
    marker = venv / ".dsjax-guidellm-ready"
    if marker.is_file():
        log(f"reusing {venv}")
        return
    log(f"installing guidellm {GUIDELLM_VERSION} into {venv}")
    if not venv_bin(venv, "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv_bin(venv, "python")), "-m", "pip", "install",
                    "--disable-pip-version-check", f"guidellm=={GUIDELLM_VERSION}", *pip_args],
                   check=True)
    marker.write_text(GUIDELLM_VERSION + "\n")


def ensure_tokenizer(venv: Path, directory: Path) -> None:
    if not (directory / "tokenizer.json").is_file():
        # guidellm's venv has `tokenizers`; vs_vllm.py holds the one tokenizer writer.
        subprocess.run([str(venv_bin(venv, "python")), str(REPO / "benchmarks" / "vs_vllm.py"),
                        "--write-tokenizer", str(directory)], check=True)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def stage_rows(result: dict) -> list[dict]:
    rows = []
    for bench in result["benchmarks"]:
        strategy = bench["config"]["strategy"]
        m = bench["metrics"]
        totals = m["request_totals"]
        label = strategy["type_"]
        if strategy.get("rate") is not None:
            label += f"@{strategy['rate']:.2f}"
        def stat(name, which):   # a stage with no successes may report None
            value = m[name]["successful"][which]
            return float("nan") if value is None else value

        rows.append({
            "stage": label, "successful": totals["successful"], "errored": totals["errored"],
            "incomplete": totals["incomplete"],
            "req_s": stat("requests_per_second", "mean"),
            "out_tok_s": stat("output_tokens_per_second", "mean"),
            "ttft_ms": stat("time_to_first_token_ms", "median"),
            "itl_ms": stat("inter_token_latency_ms", "median")})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | successful | errored | incomplete at stage end | req/s | output tok/s | "
             "TTFT median ms | ITL median ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['successful']} | {r['errored']} | {r['incomplete']} | "
                     f"{r['req_s']:.2f} | {r['out_tok_s']:.1f} | {r['ttft_ms']:.0f} | "
                     f"{r['itl_ms']:.1f} |")
    errored = sum(r["errored"] for r in rows)
    lines.append(f"\n{sum(r['successful'] for r in rows)} successful, {errored} errored "
                 f"over {len(rows)} stages")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="opt-tiny", help="dsjax model name (dummy weights)")
    ap.add_argument("--seconds", type=int, default=20, help="length of each sweep stage")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "dsjax-bench")
    ap.add_argument("--out", type=Path, default=Path("/tmp/dsjax-guidellm"))
    ap.add_argument("--pip-args", default="", help="extra arguments for the venv's pip install")
    ap.add_argument("--dsjax-args", default="", help="extra arguments for `python -m serving`")
    args = ap.parse_args()

    venv = args.cache_dir / f"guidellm-{GUIDELLM_VERSION}"
    tokenizer = args.cache_dir / "opt-tokenizer-chat"
    args.out.mkdir(parents=True, exist_ok=True)
    install_guidellm(venv, args.pip_args.split())
    ensure_tokenizer(venv, tokenizer)

    port = free_port()
    # --max-queue-delay, --max-tpot: queue every request, as vLLM does. guidellm's throughput
    # stage opens 512 streams at once; dsjax's default admission answers those estimated past
    # 4 x an SLO with 503 + Retry-After, and guidellm counts them as errors without retrying.
    cmd = [sys.executable, "-m", "serving", "--model", args.model, "--load-format", "dummy",
           "--tokenizer", str(tokenizer), "--served-model-name", args.model,
           "--port", str(port), "--no-log-status", "--max-queue-delay", "3600",
           "--max-tpot", "3600",
           *args.dsjax_args.split()]
    server = Server("dsjax", cmd, dict(os.environ), port, args.out / "server.log",
                    cwd=REPO)
    try:
        log(f"dsjax ready in {server.wait_ready(1800):.0f} s")
        result_file = args.out / "benchmarks.json"
        result_file.unlink(missing_ok=True)
        run = [str(venv_bin(venv, "guidellm")), "run",
               "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model={args.model}",
               "--profile", "kind=sweep",      # guidellm's documented default run
               "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                         f"output_tokens={args.output_tokens}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
               "--constraint", f"kind=max_duration,seconds={args.seconds}",
               "--output", f"kind=json,path={result_file}",
               "--disable-console-interactive"]
        log("$ " + " ".join(run))
        started = time.monotonic()
        with open(args.out / "guidellm.log", "w") as out:
            subprocess.run(run, check=True, stdout=out, stderr=subprocess.STDOUT)
        log(f"guidellm done in {time.monotonic() - started:.0f} s")
    finally:
        server.stop()
    text = table(stage_rows(json.loads(result_file.read_text())))
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
