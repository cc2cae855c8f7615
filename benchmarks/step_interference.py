"""Decode steps by what ran beside them when they started: nothing, a KV pull into the
instance, or another instance's prefill step (docs/validation.md, run 14).

    python benchmarks/step_interference.py --backend mp     # about 2 minutes on 2 cores
    python benchmarks/step_interference.py --backend uni

Starts validate_simulator.py's disaggregated engine (opt-tiny by default), replays that
script's calibration requests at its calibration rates and its measured requests at its
rates, fits the engine's decode step model on the calibration's steps with nothing beside
them (dsjax.eval.engine_fit), and prints, for each replay, the median milliseconds each kind
of step took beyond that fit, and the step costs the simulator would be given.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.validate_simulator import ROOT, scaled_requests, validation_engine  # noqa: E402

KINDS = {(False, False): "nothing beside", (True, False): "during a pull",
         (False, True): "during a prefill step", (True, True): "both"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--backend", choices=["uni", "mp"], default="mp")
    p.add_argument("--rates", type=float, nargs="+", default=[10, 20, 30, 40, 80])
    p.add_argument("--calibration-rates", type=float, nargs="+", default=[10, 40, 80])
    p.add_argument("--num-prompts", type=int, default=150)
    args = p.parse_args(argv)

    import numpy as np

    from dsjax.eval.engine_fit import decode_step_kinds, engine_latency_model, fit_step_costs
    from dsjax.eval.latency_model import load_profile
    from dsjax.eval.replay import replay

    reqs = scaled_requests(args.num_prompts, 8.0, 256, 32, 0)
    calibration_reqs = scaled_requests(args.num_prompts, 8.0, 256, 32, 1000)
    engine = validation_engine(args.model, "float32", "disaggregated", args.backend, reqs)
    try:
        replay(engine, reqs, max(args.rates), seed=1)   # warm
        runs = [(f"calibration {rate:g} req/s", replay(engine, calibration_reqs, rate,
                                                        seed=1000 + i))
                for i, rate in enumerate(args.calibration_rates)]
        runs += [(f"measured {rate:g} req/s", replay(engine, reqs, rate, seed=0))
                 for rate in args.rates]
    finally:
        engine.shutdown()
    profile = load_profile(ROOT / "configs" / "profiles" /
                           f"profiler-cpu-{args.model}-validation.distserve.json", args.model)
    calibration = [r for name, results in runs if name.startswith("calibration")
                   for r in results]
    fitted = engine_latency_model(calibration, profile)
    pull, beside = fit_step_costs(calibration, fitted)
    a, b, c = fitted.coeffs(1).decode_small
    print(f"{args.model}, {args.backend}: decode ms = {a:.3g} + {b:.3g}*sum(ctx) + "
          f"{c:.3g}*batch (the calibration's steps with nothing beside); fitted step costs: "
          f"{pull * 1e3:.2f} ms during a pull, {beside * 1e3:.2f} ms during a prefill step\n")
    print("| replay | " + " | ".join(f"{k}: steps, median ms beyond the fit"
                                      for k in KINDS.values()) + " |")
    print("|---|" + "---|" * len(KINDS))
    for name, results in runs:
        excess = defaultdict(list)
        for ctx, start, end, during_pull, during_prefill in decode_step_kinds(results):
            excess[during_pull, during_prefill].append((end - start) * 1e3
                                                       - fitted.decode_ms(ctx, 1))
        cells = [f"{len(excess[k])}, {np.median(excess[k]):.2f}" if excess[k] else "0"
                 for k in KINDS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
