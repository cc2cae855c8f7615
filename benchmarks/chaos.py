"""Chaos under load: instance processes frozen, delayed and killed while requests stream.

    python benchmarks/chaos.py                        # 120 requests, mp, 2 prefill + 2 decode
    python benchmarks/chaos.py --requests 40 --seed 3

A random-weight OPT checkpoint is written with transformers; an engine on the `mp` backend
(every instance its own process) serves greedy requests in waves while a fault thread, every
0.3-1.0 s, freezes a random live instance process (SIGSTOP) for 0.2-1.5 s or kills one
(SIGKILL; at most one per phase, so a peer always remains). Afterwards it prints the faults
injected and the requests completed, recomputed and failed; every completed request must give
transformers' own greedy tokens, none may hang, no live instance may hold a block, and no
instance process may outlive the engine.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def chaos_thread(engine, rng: random.Random, stop: threading.Event, log: list) -> None:
    """Faults until `stop`: freeze (SIGSTOP ... SIGCONT) or kill live instance processes."""
    killed_roles = set()
    while not stop.wait(rng.uniform(0.3, 1.0)):
        live = [(n, i) for n, i in engine.instances.items()
                if i.alive and i.host.process.is_alive()]
        if not live:
            return
        name, inst = rng.choice(live)
        role = inst.role
        pid = inst.host.process.pid
        if role not in killed_roles and rng.random() < 0.25 and \
                sum(1 for _, i in live if i.role == role) > 1:
            os.kill(pid, signal.SIGKILL)
            killed_roles.add(role)
            log.append(("kill", name))
            continue
        pause = rng.uniform(0.2, 1.5)
        os.kill(pid, signal.SIGSTOP)
        log.append(("freeze", name, round(pause, 2)))
        time.sleep(pause)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def run_chaos(engine, prompts, references, rng: random.Random, max_tokens: int,
              wave: int = 8, timeout: float = 300.0) -> dict:
    """Serve `prompts` in waves under faults; check each completed request against its
    reference tokens. Returns the figures."""
    from dsjax import SamplingParams
    from dsjax.engine.core import EngineError

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    stop, log = threading.Event(), []
    faults = threading.Thread(target=chaos_thread, args=(engine, rng, stop, log), daemon=True)
    faults.start()
    completed = failed = 0
    errors = []
    try:
        for at in range(0, len(prompts), wave):
            streams = [engine.add_request(p, params) for p in prompts[at:at + wave]]
            for stream, want in zip(streams, references[at:at + wave]):
                try:
                    got = stream.result(timeout=timeout).token_ids
                except EngineError as e:
                    failed += 1
                    errors.append(str(e)[:160])
                    continue
                assert got == want, f"wrong tokens after faults: {got} != {want}"
                completed += 1
    finally:
        stop.set()
        faults.join(10)
        for inst in engine.instances.values():   # nothing stays frozen
            try:
                os.kill(inst.host.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 60
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    while any(engine.blocks_in_use().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"requests": len(prompts), "completed": completed, "failed": failed,
            "recomputed": engine.recomputations, "hung": int(engine.has_unfinished()),
            "blocks_leaked": sum(engine.blocks_in_use().values()),
            "freezes": sum(1 for f in log if f[0] == "freeze"),
            "kills": [f[1] for f in log if f[0] == "kill"], "errors": errors[:3]}


def orphans(pids) -> list[int]:
    """Instance processes still alive (zombies reaped by nobody count as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from dsjax import Engine, EngineConfig
    sys.path.insert(0, str(ROOT / "tests"))
    from _hf_helpers import hf_greedy, make_varied_hf_opt, save_safetensors

    model = make_varied_hf_opt()
    path = save_safetensors(model, Path(tempfile.mkdtemp()) / "opt")
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(4, 1000, int(n)).tolist() for n in rng.integers(3, 40, args.requests)]
    started = time.perf_counter()
    references = [hf_greedy(model, p, args.max_tokens) for p in prompts]
    print(f"transformers' references in {time.perf_counter() - started:.0f} s", flush=True)
    engine = Engine(EngineConfig(model=str(path), dtype="float32", block_size=4,
                                 num_blocks=160, max_num_blocks_per_req=64, min_decode_rows=8,
                                 distributed_executor_backend="mp", num_prefill_instances=2,
                                 num_decode_instances=2, kv_pull_timeout_s=5.0))
    pids = [i.host.process.pid for i in engine.instances.values()]
    started = time.perf_counter()
    figures = run_chaos(engine, prompts, references, random.Random(args.seed),
                        args.max_tokens)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    engine.shutdown()
    figures["orphans"] = orphans(pids)
    print(figures)
    return 0 if not (figures["hung"] or figures["blocks_leaked"] or figures["orphans"]) else 1


if __name__ == "__main__":
    sys.exit(main())
