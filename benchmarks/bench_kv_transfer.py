"""KV transfer time against bytes between two Ray actors, over JAX transfer servers.

    python benchmarks/bench_kv_transfer.py --model opt-125m --layouts 1x1:1x1,1x1:2x1,1x2:2x1

This is the "ray" backend's KV path: each endpoint is a Ray actor (on CPU: its own XLA host
devices) holding the runner an instance of its layout (TPxPP) builds, and a
TransferServerKVLink bound to its node's address. A row moves one request of `pages` pages: the
source exports them (gathers them into fresh arrays and offers them on its transfer server),
then the destination pulls every shard, reshards it for its own layout and writes its pages.
The time is the destination's, from the pull until its pages are written (the source's gather,
dispatched just before, is part of it); the median of --iters runs after one that compiles.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402


@ray.remote
class KVEndpoint:
    """One side of a KV transfer: the runner of a (tp, pp) instance and its KV link."""

    def __init__(self, config, tp: int, pp: int, env: dict):
        from dsjax.engine.instance_hosts import setup_process
        setup_process(f"kv-endpoint-tp{tp}pp{pp}", env, config)
        import jax

        from dsjax.engine.core import resolve_model
        from dsjax.engine.instance_hosts import build_worker
        from dsjax.executor.parallel import InstancePlan
        from dsjax.executor.remote_kv import TransferServerKVLink
        model_config, model_dir = resolve_model(config.model, config.load_format)
        self.link = TransferServerKVLink(ray.util.get_node_ip_address())
        plan = InstancePlan("decode", 0, tp, pp, tuple(range(tp * pp)))
        self.runner = build_worker(plan, config, model_config, model_dir, jax.devices(),
                                   lambda message: None, self.link).runner

    def fill(self, blocks, seed: int) -> None:
        """Random K and V in these pages."""
        import numpy as np
        rng = np.random.default_rng(seed)
        pages = []
        for stage in self.runner.stages:
            layers, _, size, heads, dim = stage.pool.k.shape
            # Writes take as many pages as the padded id list (the padding is dropped).
            shape = (layers, len(stage.pool.padded_ids(blocks, 0)), size, heads, dim)
            pages.append(tuple(rng.standard_normal(shape).astype(stage.pool.k.dtype)
                               for _ in "kv"))
        self.runner.insert_pages(list(blocks), pages)

    def pages(self, blocks):
        """(K, V) of these pages over every layer and head, as host arrays."""
        import jax
        import numpy as np
        per_stage = jax.device_get(self.runner.gather_pages(list(blocks)))
        return tuple(np.concatenate([p[i][:, :len(blocks)] for p in per_stage])
                     for i in (0, 1))

    def export(self, blocks):
        """The payload for the puller (its gather may still be running: the pull waits)."""
        return self.link.export(self.runner, list(blocks))

    def pull(self, payload, blocks):
        """(bytes, seconds) to pull `payload` into these pages and have them written."""
        import jax
        start = time.perf_counter()
        nbytes = self.link.import_pages(self.runner, payload, list(blocks))
        jax.block_until_ready([(s.pool.k, s.pool.v) for s in self.runner.stages])
        return nbytes, time.perf_counter() - start


def endpoint(config, layout: tuple[int, int], node: str | None = None):
    """A KVEndpoint actor of this (tp, pp) layout with tp*pp CPU devices of its own, on the
    Ray node of address `node` if given."""
    from dsjax.engine.instance_hosts import child_environment
    tp, pp = layout
    env = child_environment("cpu", None, tp * pp)
    pin = {"resources": {f"node:{node}": 0.001}} if node else {}
    return KVEndpoint.options(num_cpus=tp * pp, runtime_env={"env_vars": env}, **pin).remote(
        config, tp, pp, env)


def parse_layouts(text: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """"1x1:2x1,..." -> [((src tp, src pp), (dst tp, dst pp)), ...]"""
    def one(part):
        tp, pp = part.split("x")
        return int(tp), int(pp)
    return [tuple(one(side) for side in pair.split(":")) for pair in text.split(",")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layouts", default="1x1:1x1,1x1:2x1,1x2:2x1",
                   help="source:destination TPxPP pairs")
    p.add_argument("--blocks", default="1,4,16,64,256", help="pages per request")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ray-address", default=None, help="a running cluster (default: local)")
    args = p.parse_args(argv)

    from dsjax.config import EngineConfig
    sizes = [int(b) for b in args.blocks.split(",")]
    config = EngineConfig(model=args.model, load_format="dummy", dtype=args.dtype,
                          block_size=args.block_size, num_blocks=2 * max(sizes),
                          compilation_cache_dir="")
    ray.init(address=args.ray_address, num_cpus=None if args.ray_address else 8,
             include_dashboard=False, log_to_driver=False)
    print("| source TPxPP | dest TPxPP | pages | tokens | KV MB | pull + write ms | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for src_layout, dst_layout in parse_layouts(args.layouts):
        src, dst = endpoint(config, src_layout), endpoint(config, dst_layout)
        ray.get(src.fill.remote(range(max(sizes)), 0))
        for n in sizes:
            pulls = []
            for _ in range(args.iters + 1):
                payload = src.export.remote(range(n))
                nbytes, seconds = ray.get(dst.pull.remote(payload, range(n, 2 * n)))
                pulls.append(seconds)
            t = statistics.median(pulls[1:])   # the first run compiles
            print(f"| {'x'.join(map(str, src_layout))} | {'x'.join(map(str, dst_layout))} | "
                  f"{n} | {n * args.block_size} | {nbytes / 1e6:.2f} | {1e3 * t:.2f} | "
                  f"{nbytes / t / 1e9:.2f} |", flush=True)
        ray.kill(src)
        ray.kill(dst)
    ray.shutdown()


if __name__ == "__main__":
    main()
