"""KV transfer and faults between two hosts: network namespaces on this machine, a Ray node each.

    python benchmarks/bench_two_hosts.py                  # root: everything below, ~10 min
    python benchmarks/bench_two_hosts.py --skip-faults --shapes none,10gbit,10gbit/1ms

Hosts (benchmarks/netns_hosts.py): A (10.77.0.1) runs the Ray head and the driver, B
(10.77.0.2) a Ray worker node; only a veth pair joins them.

1. Transfer. A KV endpoint (bench_kv_transfer.KVEndpoint: the runner of a TP1 instance and its
   transfer server bound to its node's address) on host A exports one request's pages; one on
   host B pulls them and writes its pages. Per size: the median of --iters pulls (after one
   that compiles), with the link as it is, then shaped with tc (a token bucket at a rate, or
   netem for a rate and a delay where the kernel has netem; each direction), and within host
   A (no link) as the baseline. Beside each row the simulator's
   transfer term, KV bytes / kv_link_bytes_per_s (dsjax/eval/simulator/cluster.py), with the
   link rate as kv_link_bytes_per_s.
2. Faults. The engine with the placement search's plan (a prefill and a decode instance per
   host, opt-tiny) serves 8 streamed requests of 60 tokens from host A; once each has its first
   token: the link is cut for 3 s, or cut past the heartbeat time-out (5 s), or host B's
   instances are killed, or host B is powered off (every process of it). Per fault: requests
   completed with an undisturbed run's tokens, failed (and the instances named), hung; seconds
   from the fault to the last request's end; blocks held by live instances after; instance
   processes left on host B.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.netns_hosts import IPS, TwoHosts, rate_bytes_per_s, searched_plan  # noqa: E402

HEARTBEAT_S = 5.0
FAULT_TOKENS = 60


# ---- 1. transfer (runs as the driver inside host A) -------------------------------------------

def transfer_main(argv) -> None:
    import ray

    from benchmarks.bench_kv_transfer import endpoint
    from dsjax.config import EngineConfig
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--blocks", default="1,4,16,64,256")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dst-node", default=IPS["b"])
    args = p.parse_args(argv)
    sizes = [int(b) for b in args.blocks.split(",")]
    config = EngineConfig(model=args.model, load_format="dummy", dtype="float32",
                          block_size=16, num_blocks=2 * max(sizes), compilation_cache_dir="")
    ray.init(address=f"{IPS['a']}:6379", log_to_driver=False)
    src, dst = endpoint(config, (1, 1), IPS["a"]), endpoint(config, (1, 1), args.dst_node)
    ray.get(src.fill.remote(range(max(sizes)), 0))
    rows = []
    for n in sizes:
        pulls = []
        for _ in range(args.iters + 1):
            nbytes, seconds = ray.get(dst.pull.remote(src.export.remote(range(n)),
                                                      range(n, 2 * n)))
            pulls.append(seconds)
        rows.append((n, nbytes, statistics.median(pulls[1:])))
    print(json.dumps(rows))


def transfer_table(hosts: TwoHosts, shapes: list[str], blocks: str, iters: int) -> str:
    from dsjax.eval.simulator import CROSS_NODE_BYTES_PER_S
    lines = ["| link | pages | KV MB | pull + write ms | GB/s | simulator ms (link rate) | "
             "simulator ms (default 25 GB/s) |", "|---|---|---|---|---|---|---|"]
    for shape in ["within A", *shapes]:
        rate, delay = (shape.split("/") + [None])[:2] if "/" in shape or "bit" in shape \
            else (None, None)
        try:
            hosts.shape(rate, delay)
        except RuntimeError as e:
            lines.append(f"| {shape} | not measured: {e} | | | | | |")
            print(lines[-1], flush=True)
            continue
        dst = IPS["a"] if shape == "within A" else IPS["b"]
        out = hosts.run("a", [sys.executable, __file__, "transfer", "--blocks", blocks,
                              "--iters", str(iters), "--dst-node", dst], timeout=1800)
        link = rate_bytes_per_s(rate) if rate else None
        for n, nbytes, seconds in json.loads(out.splitlines()[-1]):
            sim = f"{1e3 * nbytes / link:.2f}" if link else "-"
            lines.append(f"| {shape} | {n} | {nbytes / 1e6:.2f} | {1e3 * seconds:.2f} | "
                         f"{nbytes / seconds / 1e9:.2f} | {sim} | "
                         f"{1e3 * nbytes / CROSS_NODE_BYTES_PER_S:.3f} |")
        print("\n".join(lines[-len(blocks.split(",")):]), flush=True)
    hosts.shape()
    return "\n".join(lines)


# ---- 2. faults ---------------------------------------------------------------------------------

def serve(hosts: TwoHosts, plan: Path, workdir: Path, name: str):
    return hosts.serve(["--model", "opt-tiny", "--load-format", "dummy", "--dtype", "float32",
                        "--block-size", "4", "--num-blocks", "256",
                        "--context-max-tokens-per-batch", "256", "--max-num-blocks-per-req",
                        "64", "--min-decode-rows", "8", "--instance-heartbeat-timeout",
                        str(HEARTBEAT_S), "--compilation-cache-dir", str(workdir / "xla"),
                        "--config", str(plan)], workdir / f"{name}.log")


def run_requests(hosts: TwoHosts, prompts, fault=None) -> tuple[list[dict], float]:
    """(per-request results, seconds from the fault until the last request ended)."""
    client = hosts.client(prompts, FAULT_TOKENS)
    assert client.stdout.readline().strip() == "FIRST", client.stderr.read()
    start = time.time()
    if fault is not None:
        fault()
    out, err = client.communicate(timeout=600)
    results = json.loads(out)
    return results, max(r["end"] for r in results) - start


def fault_row(hosts: TwoHosts, what: str, prompts, clean, fault) -> str:
    results, seconds = run_requests(hosts, prompts, fault)
    done = sum(r["error"] is None and r["tokens"] == want for r, want in zip(results, clean))
    wrong = sum(r["error"] is None and r["tokens"] != want for r, want in zip(results, clean))
    hung = sum(r["error"] == "hung" for r in results)
    failed = [r["error"] for r in results if r["error"] not in (None, "hung")]
    named = sorted({n for e in failed for n in ("prefill0", "prefill1", "decode0", "decode1")
                    if n in e})
    time.sleep(2)   # the routers' last stats reach /metrics
    blocks = sum(hosts.blocks_in_use().values())
    left = len(hosts.titled("b", "ray::InstanceActor"))
    health = hosts.get("/health")
    states = ", ".join(f"{n} {'ok' if s == 'ok' else 'failed'}"
                       for n, s in health["instances"].items())
    row = (f"| {what} | {len(results)} | {done} | {wrong} | {len(failed)} ({', '.join(named)}) | "
           f"{hung} | {seconds:.1f} | {blocks:g} | {left} | {states} |")
    print(row, flush=True)
    for name, state in health["instances"].items():
        if state != "ok":
            print(f"    {name}: {state[:300]}", flush=True)
    for error in sorted({re.sub(r"gen-[0-9a-f]+-\d+", "gen-...", e) for e in failed}):
        print(f"    a request: {error[:300]}", flush=True)
    return row


def faults_table(hosts: TwoHosts, workdir: Path, chosen: list[str]) -> str:
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 1000, n).tolist() for n in (3, 17, 9, 30, 5, 12, 21, 7)]
    plan = workdir / "plan.toml"
    plan.write_text(searched_plan(workdir / "searched.toml"))
    lines = ["| fault | requests | completed (same tokens) | completed (other tokens) | "
             "failed (instances named) | hung | s from fault to last end | blocks held after | "
             "instance actors alive on B | instances after |", "|---" * 10 + "|"]

    def cut(seconds):
        def fault():
            hosts.link(up=False)
            time.sleep(seconds)
            hosts.link(up=True)
        return fault

    def kill_b():
        hosts.kill(hosts.titled("b", "ray::InstanceActor"))

    def host_b_up():
        """Host B back as a Ray node (a long cut or a power-off may have ended it)."""
        try:
            hosts.wait_for_nodes(2, timeout=10)
        except (RuntimeError, TimeoutError):
            hosts.power_off("b")
            hosts.start_node("b")
            hosts.wait_for_nodes(2)

    # One server per group: the faults after the first cut leave host B without instances.
    groups = [[("cut3", "link cut 3 s", cut(3)),
               ("cut15", f"link cut 15 s (heartbeat {HEARTBEAT_S:g} s)", cut(15))],
              [("kill", "host B's instances SIGKILLed", kill_b)],
              [("power", "host B powered off (Ray node and actors)",
                lambda: hosts.power_off("b"))]]
    for i, group in enumerate(groups):
        scenario = [(what, fault) for key, what, fault in group if key in chosen]
        if not scenario:
            continue
        host_b_up()
        server = serve(hosts, plan, workdir, f"server{i}")
        try:
            clean, _ = run_requests(hosts, prompts)
            assert all(r["error"] is None for r in clean), clean
            clean = [r["tokens"] for r in clean]
            for what, fault in scenario:
                lines.append(fault_row(hosts, what, prompts, clean, fault))
        finally:
            hosts.stop_server(server)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="none,10gbit,1gbit",
                   help="link shapes: none, RATE (tc tbf), or RATE/DELAY (tc netem), each "
                        "direction")
    p.add_argument("--blocks", default="1,4,16,64,256", help="pages (of 16 tokens) per pull")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--skip-transfer", action="store_true")
    p.add_argument("--skip-faults", action="store_true")
    p.add_argument("--faults", default="cut3,cut15,kill,power",
                   help="which faults: cut3, cut15, kill, power")
    p.add_argument("--workdir", default=None, help="keep the servers' logs here")
    args = p.parse_args(argv)
    shapes = ["unshaped" if s == "none" else s for s in args.shapes.split(",")]
    with tempfile.TemporaryDirectory(prefix="dsjax-two-hosts-") as tmp:
        work = Path(args.workdir or tmp)
        with TwoHosts(work, env={"JAX_PLATFORMS": "cpu"}) as hosts:
            if not args.skip_transfer:
                print(transfer_table(hosts, shapes, args.blocks, args.iters), flush=True)
            if not args.skip_faults:
                print(faults_table(hosts, work, args.faults.split(",")), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["transfer"]:
        transfer_main(sys.argv[2:])
    else:
        main()
