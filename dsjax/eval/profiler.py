"""`python -m dsjax.eval.profiler`: time real prefill and decode steps, fit the latency model, save it.

    python -m dsjax.eval.profiler --model opt-125m --dtype float32 --quick
    python -m dsjax.eval.profiler --model opt-13b --dtype bfloat16 --tp 1 2 4    # on accelerators

For each tensor-parallel degree that fits the devices (and divides the heads) this builds one
colocated instance with dummy weights, times prefill batches (prompt lengths -> sum(len),
sum(len^2)) and decode steps (batch x context -> sum(ctx), batch), warming every shape up first
(compiles) and taking the median of a few repeats (steps return host copies of their samples,
so they block until the device is done). The fits go to a DistServe-format profile
(dsjax.eval.latency_model.save_profile) with the hardware and the instance's KV capacity.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dsjax.config_files import profile_output_dir
from dsjax.eval.latency_model import (DEFAULT_BS_THRESHOLD, StepCoeffs, canonical_model_name,
                                      fit_decode, fit_overhead, fit_prefill, save_profile)


@dataclasses.dataclass(frozen=True)
class Grid:
    prefill_lens: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    prefill_max_tokens: int
    decode_batches: tuple[int, ...]
    decode_ctx: tuple[int, ...]
    decode_max_tokens: int      # sum(ctx) cap of one timed decode batch
    repeats: int


FULL_GRID = Grid((16, 32, 64, 128, 256, 512, 1024), (1, 2, 4, 8, 16), 4096,
                 (1, 2, 4, 8, 16, 32, 64, 128), (32, 128, 256, 512, 1024), 65536, 5)
QUICK_GRID = Grid((16, 64, 128, 256), (1, 2, 4), 1024,
                  (1, 4, 16, 32), (32, 128, 256), 8192, 3)
TINY_GRID = Grid((8, 128), (1, 2), 256, (1, 16), (16, 128), 4096, 1)   # tests


@dataclasses.dataclass
class Fit:
    coeffs: tuple[float, ...]
    r2: float
    max_rel_err: float


def fit_quality(rows: np.ndarray, coeffs: Sequence[float], ms: Sequence[float]) -> Fit:
    ms = np.asarray(ms, float)
    pred = np.asarray(rows, float) @ np.asarray(coeffs, float)
    ss_res = float(((ms - pred) ** 2).sum())
    ss_tot = float(((ms - ms.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(tuple(coeffs), r2, float(np.max(np.abs(pred - ms) / ms)))


def _median_ms(fn: Callable[[], object], repeats: int, runner) -> tuple[float, float]:
    """(median device ms, median host ms) of a step: the host part is the step's wall time
    minus the time it waited for the device's results (runner.last_wait_s), i.e. input
    packing, dispatch and bookkeeping, which the latency model carries as its own term."""
    fn()   # warm-up: compiles this shape bucket
    fn()
    device, host = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        total = (time.perf_counter() - start) * 1e3
        host.append(total - runner.last_wait_s * 1e3)
        device.append(runner.last_wait_s * 1e3)
    return statistics.median(device), statistics.median(host)


def profile_tp(model: str, dtype: str, tp: int, grid: Grid, devices, block_size: int = 16,
               temperature: float = 1.0, log: Callable[[str], None] = print):
    """Time one TP degree. Returns (prefill batches, prefill ms, decode batches, decode ms,
    KV capacity tokens of such an instance)."""
    import jax.numpy as jnp

    from dsjax.executor.batch import DecodeRow, PrefillRow, SamplingRow
    from dsjax.executor.kernels import get_attention_backend
    from dsjax.executor.kv_cache import auto_cpu_kv_bytes, num_blocks_for_budget
    from dsjax.executor.parallel import single_instance_spec
    from dsjax.executor.runner import ModelRunner
    from dsjax.sampling_params import SamplingParams
    from dsjax.models.registry import config_from_name
    from dsjax.models.weights import dummy_params

    cfg = config_from_name(model)
    jdtype = jnp.dtype(dtype)
    spec = single_instance_spec("colocated", devices, tp=tp)
    max_ctx = max(max(grid.decode_ctx), max(grid.prefill_lens)) + 1
    pages_per_seq = -(-max_ctx // block_size)
    # Distinct pages for a few sequences; larger batches reuse them (the cost is the same reads).
    num_pages = pages_per_seq * 4 + 8
    max_batch = max(max(grid.decode_batches), max(grid.prefill_batches))
    runner = ModelRunner(spec, cfg, lambda sh: dummy_params(cfg, jdtype, 0, sh), dtype=jdtype,
                         num_pages=num_pages, page_size=block_size,
                         attention=get_attention_backend("auto"), max_batch_size=max_batch,
                         max_tokens_per_batch=grid.prefill_max_tokens,
                         max_blocks_per_request=pages_per_seq)
    # The benchmark payload samples at temperature 1 (the sampler's sort is part of the step).
    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=1)
    rng = np.random.default_rng(0)

    def table(i: int, n_tokens: int) -> tuple[int, ...]:
        start = (i % 4) * pages_per_seq
        return tuple(range(start, start + -(-n_tokens // block_size)))

    def prompt_row(i: int, n: int) -> PrefillRow:
        ids = tuple(int(t) for t in rng.integers(4, cfg.vocab_size, n))
        return PrefillRow(ids, table(i, n), (SamplingRow(params, i, 0),))

    def decode_row(i: int, ctx: int) -> DecodeRow:   # ctx tokens including the new one
        return DecodeRow(5, ctx - 1, table(i, ctx), SamplingRow(params, i, 1))

    overhead = []

    def timed(kind: str, step, make_row, lengths, batches, max_tokens):
        """Median device ms per (length, batch) cell within max_tokens; host ms to overhead."""
        cells, times = [], []
        for n in lengths:
            for b in batches:
                if n * b > max_tokens:
                    continue
                rows = [make_row(i, n) for i in range(b)]
                ms, host = _median_ms(lambda: step(rows), grid.repeats, runner)
                cells.append([n] * b)
                times.append(ms)
                overhead.append((n * b, host))
                log(f"  tp{tp} {kind} {b:>3} x {n:>5} tokens: {ms:8.2f} ms (+ {host:.2f} ms host)")
        return cells, times

    pre_batches, pre_ms = timed("prefill", runner.prefill, prompt_row, grid.prefill_lens,
                                grid.prefill_batches, grid.prefill_max_tokens)
    dec_batches, dec_ms = timed("decode ", runner.decode, decode_row, grid.decode_ctx,
                                grid.decode_batches, grid.decode_max_tokens)
    # On a CPU, the KV budget an engine spanning these devices gets by default (a share of
    # free memory: --cpu-kv-cache-bytes 0), so the simulator sees the engine's capacity.
    blocks = num_blocks_for_budget(cfg, block_size=block_size, dtype=jdtype, tp=tp, pp=1,
                                   devices=spec.devices,
                                   cpu_kv_cache_bytes=auto_cpu_kv_bytes(len(devices)))
    return pre_batches, pre_ms, dec_batches, dec_ms, blocks * block_size, overhead


def _weighted_lstsq(rows: np.ndarray, ms: Sequence[float]) -> tuple[float, float, float]:
    """Non-negative coefficients minimising the relative error: least squares of
    rows/ms . x = 1 over every subset of free coefficients (three: 8 subsets), keeping the best
    solution whose coefficients are all >= 0. Non-negative coefficients make every prediction
    positive and non-decreasing in tokens and batch size."""
    ms = np.asarray(ms, float)
    a, y = rows / ms[:, None], np.ones_like(ms)
    best, best_res = np.zeros(rows.shape[1]), float(len(ms))
    for mask in range(1, 1 << rows.shape[1]):
        cols = [j for j in range(rows.shape[1]) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if np.any(sol < 0):
            continue
        x = np.zeros(rows.shape[1])
        x[cols] = sol
        res = float(((a @ x - y) ** 2).sum())
        if res < best_res:
            best, best_res = x, res
    return tuple(float(v) for v in best)


def fit_all(pre_batches, pre_ms, dec_batches, dec_ms, threshold: int = DEFAULT_BS_THRESHOLD,
            relative: bool = True) -> tuple[StepCoeffs, Fit, Fit]:
    """Fit both phases. relative=False: dsjax.eval.latency_model.fit_prefill / fit_decode (least squares
    in ms, so the largest batches dominate and small steps can even be predicted negative, as
    on a CPU where a fixed per-step cost dominates small batches); relative=True (default):
    the same model fitted to minimise relative error, which keeps every measured shape within
    a similar percentage, with coefficients constrained to be >= 0."""
    prefill = fit_prefill(pre_batches, pre_ms)
    small, large = fit_decode(dec_batches, dec_ms, threshold)
    if relative:
        prefill = _weighted_lstsq(np.array([(1.0, sum(b), sum(x * x for x in b))
                                            for b in pre_batches]), pre_ms)
        fits = {}
        for side in (True, False):
            pick = [i for i, b in enumerate(dec_batches) if (len(b) < threshold) == side]
            if len(pick) >= 3:
                rows = np.array([(1.0, sum(dec_batches[i]), len(dec_batches[i])) for i in pick])
                fits[side] = _weighted_lstsq(rows, [dec_ms[i] for i in pick])
        small = fits.get(True, fits.get(False))
        large = fits.get(False, small)
    pre_rows = np.array([(1.0, sum(b), sum(x * x for x in b)) for b in pre_batches])
    pf = fit_quality(pre_rows, prefill, pre_ms)
    dec_rows = np.array([(1.0, sum(b), len(b)) for b in dec_batches])
    pred = np.array([np.dot(r, small if len(b) < threshold else large)
                     for r, b in zip(dec_rows, dec_batches)])
    ms = np.asarray(dec_ms)
    ss_tot = float(((ms - ms.mean()) ** 2).sum())
    r2 = 1.0 - float(((ms - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    df = Fit(small, r2, float(np.max(np.abs(pred - ms) / ms)))
    return StepCoeffs(prefill, small, large, threshold), pf, df


def default_tps(model: str, devices) -> list[int]:
    from dsjax.models.registry import config_from_name
    config = config_from_name(model)
    return [t for t in (1, 2, 4, 8, 16) if t <= len(devices) and config.tensor_parallel_ok(t)]


def hardware_description(devices) -> dict:
    d = devices[0]
    stats = d.memory_stats() if d.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        memory = float(stats["bytes_limit"])
    else:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return {"gpu": f"{d.device_kind} ({d.platform})", "gpu_memory_bytes": memory,
            "num_devices": len(devices), "host_cpus": os.cpu_count()}


def default_output(model: str, devices) -> Path:
    platform = devices[0].platform
    kind = devices[0].device_kind.lower().replace(" ", "-")
    where = platform if kind == platform else f"{platform}-{kind}"
    name = canonical_model_name(model).split("/")[-1]
    return profile_output_dir() / f"profiler-{where}-{name}.distserve.json"


def run_profile(model: str, dtype: str = "float32", tps: Sequence[int] | None = None,
                output: str | os.PathLike | None = None, grid: Grid = QUICK_GRID,
                devices=None, temperature: float = 1.0, relative_fit: bool = True,
                log: Callable[[str], None] = print) -> Path:
    """Profile, fit and save; returns the profile's path."""
    import jax
    devices = list(jax.devices() if devices is None else devices)
    tps = list(tps) if tps else default_tps(model, devices)
    if not tps:
        raise ValueError(f"no tensor-parallel degree of {model} fits {len(devices)} devices")
    coeffs, kv, overhead = {}, {}, []
    for tp in tps:
        started = time.perf_counter()
        pb, pm, db, dm, kv_tokens, host = profile_tp(model, dtype, tp, grid, devices,
                                                     temperature=temperature, log=log)
        overhead += host
        step, pf, df = fit_all(pb, pm, db, dm, relative=relative_fit)
        coeffs[tp], kv[(tp, 1)] = step, kv_tokens
        log(f"tp{tp}: prefill ms = {pf.coeffs[0]:.4g} + {pf.coeffs[1]:.4g}*sum(len) + "
            f"{pf.coeffs[2]:.4g}*sum(len^2)   R^2 {pf.r2:.4f}, max rel err {pf.max_rel_err:.1%}")
        log(f"tp{tp}: decode  ms = {df.coeffs[0]:.4g} + {df.coeffs[1]:.4g}*sum(ctx) + "
            f"{df.coeffs[2]:.4g}*batch   R^2 {df.r2:.4f}, max rel err {df.max_rel_err:.1%}")
        log(f"tp{tp}: KV capacity {kv_tokens} tokens; profiled in "
            f"{time.perf_counter() - started:.1f} s")
    step_overhead = fit_overhead(*zip(*overhead))
    log(f"host overhead per step: {step_overhead.base_ms:.3g} ms + "
        f"{step_overhead.per_token_ms:.3g} ms per context token")
    path = Path(output) if output else default_output(model, devices)
    save_profile(path, model, coeffs, kv, {**hardware_description(devices), "dtype": dtype,
                                           "temperature": temperature}, overhead=step_overhead)
    log(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsjax.eval.profiler",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tp", type=int, nargs="+", default=None,
                   help="tensor-parallel degrees (default: all that fit the devices)")
    p.add_argument("--output", default=None,
                   help="profile JSON, merged into if it exists (default: configs/profiles/ in a "
                        "source checkout, the current directory when dsjax is installed)")
    p.add_argument("--quick", action="store_true", help="a small grid (minutes on a CPU)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the timed steps (0: greedy, no sampler sort)")
    p.add_argument("--fit", choices=("relative", "absolute"), default="relative",
                   help="relative: non-negative, relative-error least squares (default); "
                        "absolute: dsjax.eval.latency_model.fit_prefill / fit_decode")
    args = p.parse_args(argv)
    run_profile(args.model, args.dtype, args.tp, args.output,
                QUICK_GRID if args.quick else FULL_GRID, temperature=args.temperature,
                relative_fit=args.fit == "relative")
    return 0


if __name__ == "__main__":
    sys.exit(main())
