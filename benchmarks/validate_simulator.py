"""Simulator vs real engine: SLO attainment of the same requests and arrivals (paper Table 2).

    python benchmarks/validate_simulator.py                      # opt-tiny on this machine
    python benchmarks/validate_simulator.py --reprofile --out docs/validation.md

1. Profile the model on this machine (python -m dsjax.eval.profiler), or load the profile written before.
2. Sample ShareGPT, scale the lengths down (divide, cap) so a CPU run takes minutes.
3. For each mode (disaggregated 1 prefill + 1 decode instance; colocated): fit the step model
   from the engine's own steps (dsjax.eval.engine_fit) on a calibration replay of *other*
   ShareGPT requests (another seed) at the calibration rates.
4. For each rate: replay the requests against an in-process Engine (dsjax.eval.replay) and
   simulate the same requests with the same arrival times (dsjax.eval.simulator) under both
   step models (engine-fitted, and the runner profile), then compare SLO attainment and the
   knee (the rate where attainment crosses 90%, interpolated between measured rates).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- validate_simulator.py writes below this line -->"


# The engines' batch limits (the simulator's too) and KV pages.
LIMITS = dict(context_max_batch_size=128, context_max_tokens_per_batch=1024,
              decoding_max_batch_size=256)
BLOCK_SIZE, NUM_BLOCKS = 16, 4096


def validation_engine(model: str, dtype: str, mode: str, backend: str, reqs):
    """The engine a validation run measures (dummy weights), warmed up for every shape the
    requests `reqs` reach before it is ready."""
    from dsjax.config import EngineConfig
    from dsjax.engine.core import Engine
    return Engine(EngineConfig(
        model=model, load_format="dummy", dtype=dtype, mode=mode,
        block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_num_blocks_per_req=64,
        distributed_executor_backend=backend,
        # The simulator models DistServe, which caches no prefixes, and every rate replays
        # the same prompts: with the cache on, real prefills computed only the prompts'
        # last blocks (real steps 0.41-0.59 of the fit, which is keyed on whole prompts).
        enable_prefix_caching=False,
        warmup_max_prompt_len=max(r.prompt_len for r in reqs),
        warmup_max_context_len=max(r.prompt_len + r.output_len for r in reqs),
        warmup_max_prefill_batch=32, warmup_max_decode_batch=64, **LIMITS))


def scaled_requests(num: int, scale: float, max_prompt: int, max_output: int, seed: int = 0):
    from dsjax.eval.workloads import TestRequest, get_dataset
    reqs = get_dataset("sharegpt").sample(num, seed=seed)
    return [TestRequest(r.prompt, max(4, min(max_prompt, round(r.prompt_len / scale))),
                        max(2, min(max_output, round(r.output_len / scale)))) for r in reqs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--profile", default=None, help="profile JSON (default: configs/profiles/"
                   "profiler-cpu-<model>-validation.distserve.json, profiled when missing)")
    p.add_argument("--reprofile", action="store_true", help="profile even if the file exists")
    p.add_argument("--num-prompts", type=int, default=150)
    p.add_argument("--rates", type=float, nargs="+", default=[10, 20, 30, 40, 50, 60, 80])
    p.add_argument("--scale", type=float, default=8.0, help="divide ShareGPT lengths by this")
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--ttft-slo", type=float, default=0.04, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.015, help="seconds")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0 = greedy; see docs/validation.md)")
    p.add_argument("--modes", nargs="+", default=["disaggregated", "colocated"])
    p.add_argument("--backend", choices=["uni", "mp"], default="mp",
                   help="executor backend: mp runs each instance in its own process, uni both "
                        "as threads of this one (on a small machine either way they share the "
                        "cores: the fitted step costs charge what that costs, run 14)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-rates", type=float, nargs="+", default=None,
                   help="rates of the calibration replays the engine-fitted model is fitted on "
                        "(default: the lowest, middle and highest of --rates); their requests "
                        "are another ShareGPT sample (seed + 1000) than the measured ones")
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from dsjax.eval.engine_fit import (MIN_STEPS, decode_steps, engine_latency_model, fit_link,
                                       fit_pull_overhead, fit_step_costs,
                                       migration_samples, prefill_batches)
    from dsjax.eval.profiler import Grid, run_profile
    from dsjax.eval.latency_model import load_profile
    from dsjax.eval.replay import arrival_offsets, replay
    from dsjax.eval.results import attainment
    from dsjax.eval.simulator import Cluster, Parallelism, SimConfig

    # On a CPU a KV transfer shares the cores of its source's steps (SimConfig). (Asked
    # without starting JAX here: with mp it would claim the GPUs the instances need.)
    from dsjax.engine.instance_hosts import accelerator_count
    on_cpu = (accelerator_count()[0] if args.backend == "mp" else jax.default_backend()) == "cpu"
    compiles = [0]
    try:   # count XLA compiles during measured runs (each one stalls a step ~0.5 s on a CPU)
        from jax._src import monitoring

        def on_event(event, duration, **kw):
            if "backend_compile" in event:
                compiles[0] += 1
        monitoring.register_event_duration_secs_listener(on_event)
    except Exception:  # private API; the count is informative only
        compiles[0] = -1

    started = time.perf_counter()
    name = args.model.split("/")[-1]
    profile = Path(args.profile or ROOT / "configs" / "profiles" /
                   f"profiler-cpu-{name}-validation.distserve.json")
    grid = Grid(prefill_lens=(8, 16, 32, 64, 128, 256), prefill_batches=(1, 2, 4, 8),
                prefill_max_tokens=1024, decode_batches=(1, 2, 4, 8, 16, 32, 64),
                decode_ctx=(16, 64, 128, 256, 288), decode_max_tokens=16384, repeats=5)
    if args.reprofile or not profile.exists():
        print(f"== profiling {args.model} into {profile}")
        run_profile(args.model, args.dtype, [1], profile, grid, devices=jax.devices()[:1],
                    temperature=args.temperature)
    model = load_profile(profile, args.model)
    if model.dtype_bytes != jax.numpy.dtype(args.dtype).itemsize:
        raise SystemExit(f"{profile} was profiled in another dtype than --dtype {args.dtype}: "
                         f"pass --reprofile (its steps and KV bytes would not match the engine's)")
    co = model.coeffs(1)
    model.kv_capacity[(1, 1)] = BLOCK_SIZE * NUM_BLOCKS
    reqs = scaled_requests(args.num_prompts, args.scale, args.max_prompt, args.max_output, args.seed)
    mean_in = np.mean([r.prompt_len for r in reqs])
    mean_out = np.mean([r.output_len for r in reqs])
    print(f"== {len(reqs)} ShareGPT requests, lengths / {args.scale:g} capped at "
          f"{args.max_prompt}/{args.max_output}: mean in {mean_in:.1f}, out {mean_out:.1f}")

    limits = LIMITS
    calibration_reqs = scaled_requests(args.num_prompts, args.scale, args.max_prompt,
                                       args.max_output, args.seed + 1000)
    rates = sorted(args.rates)
    calibration_rates = args.calibration_rates or sorted({rates[0], rates[len(rates) // 2],
                                                          rates[-1]})
    rows, step_ratios, fitted_models, fitted_links = [], {}, {}, {}
    for mode in args.modes:
        t = time.perf_counter()
        engine = validation_engine(args.model, args.dtype, mode, args.backend, reqs)
        try:
            replay(engine, reqs, max(args.rates), seed=args.seed + 1, temperature=args.temperature)
            print(f"== {mode}: ready and warm in {time.perf_counter() - t:.1f} s")
            calibration, transfers_at = [], {}
            for i, rate in enumerate(calibration_rates):
                transfers_before = len(engine.kv_transfers)
                calibration += replay(engine, calibration_reqs, rate, seed=args.seed + 1000 + i,
                                      temperature=args.temperature)
                transfers_at[rate] = [t for t in list(engine.kv_transfers)[transfers_before:]
                                      if t[0] > 0]
            fitted = engine_latency_model(calibration, model)
            # What a pull in flight, and a prefill step running beside, add to each of the
            # decode instance's steps (on a CPU their work shares the cores), from the
            # calibration's steps against that fit.
            step_costs = fit_step_costs(calibration, fitted) if mode == "disaggregated" \
                else (0.0, 0.0)
            # (decode is fitted on the steps with nothing beside them, where there are enough)
            alone = decode_steps(calibration, alone=True)
            fitted_models[mode] = (fitted.coeffs(1), len(prefill_batches(calibration)),
                                   len(alone) if len(alone) >= MIN_STEPS
                                   else len(decode_steps(calibration)))
            print(f"== {mode}: engine-fitted step model {fitted_models[mode][0]}")
            # The KV link from the transfers alone: latency + bytes / bandwidth. (A bandwidth
            # alone charged pulls' fixed cost per byte: long prompts' pulls came out 10x too
            # slow. Whole pulls, migration_begin to migration_end, hold the waits for both
            # instances' step ends, which the simulator models itself.) On a CPU, fitted on the
            # lowest calibration rate's: there a transfer beside a source step waits for it,
            # which the simulator models too (run 11: at higher rates half the transfers took
            # 500-590 ms, a prefill step, and a line through both kinds fitted neither).
            transfers = (transfers_at[min(calibration_rates)] if on_cpu
                         else [t for ts in transfers_at.values() for t in ts])
            latency, link_bps = fit_link(transfers)
            pulls = migration_samples(
                calibration, engine.model_config.kv_bytes_per_token(np.dtype(args.dtype).itemsize))

            def sim_config(overhead: float = 0.0, step_costs=(0.0, 0.0)):
                return SimConfig(mode=mode, prefill=Parallelism(1, 1), decode=Parallelism(1, 1),
                                 prefill_max_batch=limits["context_max_batch_size"],
                                 prefill_max_tokens=limits["context_max_tokens_per_batch"],
                                 decode_max_batch=limits["decoding_max_batch_size"],
                                 colocated_max_batch=limits["decoding_max_batch_size"],
                                 colocated_max_tokens=limits["context_max_tokens_per_batch"],
                                 kv_link_bytes_per_s=link_bps, kv_link_latency_s=latency,
                                 kv_transfer_waits_for_source_step=on_cpu,
                                 kv_pull_overhead_s=overhead,
                                 kv_pull_step_cost_s=step_costs[0],
                                 decode_cost_beside_prefill_s=step_costs[1])
            # What the real hand-offs (first token to second) took beyond their simulated twins
            # at the lowest calibration rate (the same requests and arrivals; the least
            # queueing to misfit): the messages around a pull, which neither the link nor the
            # step-end waits hold (run 11: opt-tiny's pulls took a median 9.4 ms around 1.1 ms
            # transfers). Charged to the engine fit's simulation only, which it was fitted to.
            overhead = 0.0
            if mode == "disaggregated":
                i, lowest = min(enumerate(calibration_rates), key=lambda p: p[1])
                at = i * len(calibration_reqs)   # the calibration replays run in that order
                overhead = fit_pull_overhead(
                    calibration[at:at + len(calibration_reqs)],
                    [s.to_result() for s in Cluster(fitted, sim_config(0.0, step_costs)).run(
                        calibration_reqs, arrival_offsets(len(calibration_reqs), lowest, 1.0,
                                                          args.seed + 1000 + i))])
            fitted_links[mode] = (latency, link_bps, overhead, step_costs, {
                rate: (1e3 * float(np.median([s for _, s in ts])),
                       float(np.mean([s >= 0.1 for _, s in ts])), len(ts))
                for rate, ts in transfers_at.items() if ts})
            if pulls and transfers:
                print(f"== {mode}: KV link fitted from {len(transfers)} transfers: "
                      f"{latency * 1e3:.2f} ms + bytes / {link_bps / 1e9:.3g} GB/s (whole pulls: "
                      f"median {1e3 * float(np.median([s for _, s in pulls])):.1f} ms, transfers "
                      f"alone {1e3 * float(np.median([s for _, s in transfers])):.1f} ms); "
                      f"hand-offs beyond the simulated ones: {overhead * 1e3:.2f} ms (median; "
                      f"charged: {max(0.0, overhead) * 1e3:.2f} ms)")
            measured, predicted = [], []
            for rate in args.rates:
                compiles[0] = 0
                offsets = arrival_offsets(len(reqs), rate, 1.0, args.seed)
                real = replay(engine, reqs, rate, seed=args.seed, temperature=args.temperature,
                              offsets=offsets)
                simulate = lambda m, *extra: [s.to_result() for s in  # noqa: E731
                                              Cluster(m, sim_config(*extra)).run(reqs, offsets)]
                sim = simulate(fitted, max(0.0, overhead), step_costs)
                sim_profile = simulate(model, 0.0, (0.0, 0.0))
                # The engine fit without the step costs beside: what that term changes, on the
                # same real run.
                sim_steady = simulate(fitted, max(0.0, overhead), (0.0, 0.0)) \
                    if any(step_costs) else sim
                ra, sa = attainment(real, args.ttft_slo, args.tpot_slo), \
                    attainment(sim, args.ttft_slo, args.tpot_slo)
                mean = lambda rs, f: 1e3 * float(np.mean([getattr(r, f) for r in rs]))
                row = dict(mode=mode, rate=rate, real=ra, sim=sa,
                           sim_profile=attainment(sim_profile, args.ttft_slo, args.tpot_slo),
                           sim_steady=attainment(sim_steady, args.ttft_slo, args.tpot_slo),
                           ttft=(mean(real, "ftl"), mean(sim, "ftl")),
                           tpot=(mean(real, "tpot"), mean(sim, "tpot")))
                row["compiles"] = compiles[0]
                steps = decode_steps(real)
                row["decode_ratio"] = float(np.median([secs * 1e3 / fitted.decode_ms(ctx, 1)
                                                       for ctx, secs in steps])) if steps else 0.0
                row["decode_ratio_profile"] = float(np.median(
                    [secs * 1e3 / model.decode_ms(ctx, 1) for ctx, secs in steps])) if steps else 0.0
                row["decode_batch"] = float(np.mean([len(c) for c, _ in steps])) if steps else 0.0
                rows.append(row)
                for lens, secs in prefill_batches(real):
                    measured.append(secs * 1e3)
                    predicted.append(fitted.prefill_ms(lens, 1))
                print(f"{mode:>13} {rate:6.1f} req/s  real {ra[0]:6.1%} (ttft {ra[1]:6.1%} tpot "
                      f"{ra[2]:6.1%})  sim {sa[0]:6.1%} (ttft {sa[1]:6.1%} tpot {sa[2]:6.1%}; "
                      f"runner profile {row['sim_profile'][0]:6.1%})  "
                      f"mean TTFT {row['ttft'][0]:.1f}/{row['ttft'][1]:.1f} ms  mean TPOT "
                      f"{row['tpot'][0]:.2f}/{row['tpot'][1]:.2f} ms  decode step real/profile "
                      f"{row['decode_ratio']:.2f} (mean batch {row['decode_batch']:.1f})  "
                      f"compiles {compiles[0]}", flush=True)
            ratio = np.array(measured) / np.array(predicted)
            step_ratios[mode] = (float(np.median(ratio)), float(np.mean(ratio)), len(ratio))
        finally:
            engine.shutdown()

    errors = [abs(r["real"][0] - r["sim"][0]) * 100 for r in rows]
    report = render(args, profile, co, rows, errors, step_ratios, fitted_models, fitted_links,
                    calibration_rates, mean_in, mean_out, time.perf_counter() - started)
    print(report)
    if args.out:
        out = Path(args.out)
        old = out.read_text() if out.exists() else ""
        # Keep the hand-written part of an existing report (everything up to the marker).
        head = old[:old.index(MARKER)] if MARKER in old else ""
        out.write_text(head + MARKER + "\n" + report)
        print(f"wrote {args.out}")
    return 0


def knee(points, target: float = 0.9):
    """The rate where attainment first falls below `target`, interpolated linearly between the
    last measured rate at or above it and the first below; None when no rate falls below, 0.0
    when the lowest already does. points: [(rate, attainment)]."""
    points = sorted(points)
    for (r0, a0), (r1, a1) in zip([(0.0, 1.0)] + points, points):
        if a1 < target:
            return 0.0 if r0 == 0.0 else r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return None


def render(args, profile, co, rows, errors, step_ratios, fitted_models, fitted_links,
           calibration_rates, mean_in, mean_out, seconds) -> str:
    import jax
    cmd = "python benchmarks/validate_simulator.py " + " ".join(sys.argv[1:])
    lines = [
        "| mode | rate (req/s) | real attainment | simulated (engine fit) | error (pp) |"
        " simulated (runner profile) | error (pp) | real / sim TTFT-only | real / sim TPOT-only |"
        " mean TTFT ms real / sim | mean TPOT ms real / sim |"
        " real decode step / fit (/ profile) (mean batch) | compiles |"
        " simulated (engine fit, no step costs beside) | error (pp) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, e in zip(rows, errors):
        ep = abs(r["real"][0] - r["sim_profile"][0]) * 100
        lines.append(f"| {r['mode']} | {r['rate']:g} | {r['real'][0]:.1%} | {r['sim'][0]:.1%} | "
                     f"{e:.1f} | {r['sim_profile'][0]:.1%} | {ep:.1f} | "
                     f"{r['real'][1]:.1%} / {r['sim'][1]:.1%} | "
                     f"{r['real'][2]:.1%} / {r['sim'][2]:.1%} | {r['ttft'][0]:.1f} / "
                     f"{r['ttft'][1]:.1f} | {r['tpot'][0]:.2f} / {r['tpot'][1]:.2f} | "
                     f"{r['decode_ratio']:.2f} ({r['decode_ratio_profile']:.2f}) "
                     f"({r['decode_batch']:.1f}) | {r['compiles']} | "
                     f"{r['sim_steady'][0]:.1%} | "
                     f"{abs(r['real'][0] - r['sim_steady'][0]) * 100:.1f} |")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fmt = lambda x: "none below 90%" if x is None else f"{x:.1f} req/s"  # noqa: E731
    summary = []
    for m in modes:
        mine = [(r, e) for r, e in zip(rows, errors) if r["mode"] == m]
        real_knee = knee([(r["rate"], r["real"][0]) for r, _ in mine])
        sim_knee = knee([(r["rate"], r["sim"][0]) for r, _ in mine])
        prof_knee = knee([(r["rate"], r["sim_profile"][0]) for r, _ in mine])
        steady_knee = knee([(r["rate"], r["sim_steady"][0]) for r, _ in mine])
        below = [e for r, e in mine if real_knee is None or r["rate"] < real_knee]
        knee_err = (f" ({abs(sim_knee - real_knee) / real_knee:.0%} off)"
                    if real_knee and sim_knee is not None else "")
        coeffs, n_pre, n_dec = fitted_models[m]
        summary += [
            f"- **{m}**: max error {max(e for _, e in mine):.1f} pp; below the real knee "
            f"{max(below):.1f} pp" if below else f"- **{m}**: no rate below the real knee",
            f"  - knee (attainment crosses 90%): real {fmt(real_knee)}, engine-fit sim "
            f"{fmt(sim_knee)}{knee_err}, runner-profile sim {fmt(prof_knee)}, engine-fit sim "
            f"without the step costs beside {fmt(steady_knee)}",
            f"  - engine-fitted step model from {n_pre} prefill and {n_dec} decode steps: "
            f"prefill ms = {coeffs.prefill[0]:.3g} + {coeffs.prefill[1]:.3g}*sum(len) + "
            f"{coeffs.prefill[2]:.3g}*sum(len^2); decode ms = {coeffs.decode_small[0]:.3g} + "
            f"{coeffs.decode_small[1]:.3g}*sum(ctx) + {coeffs.decode_small[2]:.3g}*batch"]
        if m == "disaggregated":
            latency, bps, overhead, step_costs, by_rate = fitted_links[m]
            summary.append(f"  - KV link fitted from the calibration's transfers (on a CPU the "
                           f"lowest rate's; the waits for step ends around them are simulated, "
                           f"and on a CPU the wait for the source's running step): "
                           f"{latency * 1e3:.2f} ms + bytes / {bps / 1e9:.3g} GB/s; real "
                           f"hand-offs (first token to second) at the lowest calibration rate "
                           f"took a median {overhead * 1e3:.2f} ms beyond their simulated twins, "
                           f"{max(0.0, overhead) * 1e3:.2f} ms charged to each pull of the "
                           f"engine-fit simulation; a decode step started during a pull took "
                           f"{step_costs[0] * 1e3:.2f} ms beyond the fit and one started during "
                           f"a prefill step {step_costs[1] * 1e3:.2f} ms (the calibration's "
                           f"steps, medians), charged to the engine-fit simulation's steps")
            summary.append("  - the calibration's transfers, by rate: " + "; ".join(
                f"{rate:g} req/s: median {median:.1f} ms, {slow:.0%} of {n} at 100 ms or more"
                for rate, (median, slow, n) in by_rate.items()))
    ratios = "; ".join(f"{m}: median {v[0]:.2f} over {v[2]} batches"
                       for m, v in step_ratios.items())
    return "\n".join([
        "## Measured run", "",
        f"Command: `{cmd}` ({seconds / 60:.1f} min).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; executor backend "
        f"{args.backend}: " + (
            "each instance in its own process on its own cores (the profile ran on all of them)."
            if args.backend == "mp" else
            "both instances of the disaggregated engine share the one CPU device's cores."),
        f"Model: {args.model} {args.dtype}, dummy weights, sampling temperature "
        f"{args.temperature:g}. Runner profile: `{Path(profile).relative_to(ROOT) if Path(profile).is_relative_to(ROOT) else profile}` "
        f"(prefill ms = {co.prefill[0]:.3g} + {co.prefill[1]:.3g}*sum(len) + "
        f"{co.prefill[2]:.3g}*sum(len^2); decode ms = {co.decode_small[0]:.3g} + "
        f"{co.decode_small[1]:.3g}*sum(ctx) + {co.decode_small[2]:.3g}*batch).",
        f"Workload: {args.num_prompts} ShareGPT requests (seed {args.seed}), lengths divided by "
        f"{args.scale:g} and capped at {args.max_prompt} / {args.max_output} (means "
        f"{mean_in:.1f} / {mean_out:.1f}); Poisson arrivals (cv 1), the same arrival times for "
        f"the engine and the simulator. SLOs: TTFT {args.ttft_slo * 1e3:g} ms, TPOT "
        f"{args.tpot_slo * 1e3:g} ms. The engine fit's calibration: {args.num_prompts} other "
        f"ShareGPT requests (seed {args.seed + 1000}) replayed at "
        f"{', '.join(f'{r:g}' for r in calibration_rates)} req/s on the same engine.", "",
        *lines, "",
        *summary, "",
        f"Real prefill step time / engine-fit prediction, from the engine's context_begin/end "
        f"events: {ratios}.", ""])


if __name__ == "__main__":
    sys.exit(main())
