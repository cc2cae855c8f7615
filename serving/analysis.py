"""Goodput analysis of a directory of `.exp` runs (one or more backends, several rates).

    python -m serving.analysis RESULTS_DIR --model opt-13b --workload sharegpt --out plots/

Prints and writes a goodput table (markdown) and writes the paper-style figure (PNG + PDF).
Goodput = the highest per-GPU rate with >= 90% SLO attainment, interpolated linearly between the
two measured rates around the first drop below 90%. The SLO-scale view fixes a rate and finds the
tightest factor on both SLOs that still gives >= 90%.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dsjax.config_files import CONFIG_DIR
from dsjax.eval.results import FailedRequest, RequestResult, attainment, load_exp, load_failures

SLO_CONFIG = CONFIG_DIR / "slo.toml"
TARGET = 0.9
DISAGGREGATED = "distserve"
COLOCATED = ("vllm", "openai", "colocated")
# GPUs per system in the paper's runs (DISTSERVE.md, "Placements"; vLLM TP 1/4/8).
PAPER_NUM_GPUS = {"opt-13b": {"distserve": 3, "vllm": 1},
                  "opt-66b": {"distserve": 8, "vllm": 4},
                  "opt-175b": {"distserve": 21, "vllm": 8}}
_EXP_NAME = re.compile(r"^(?P<backend>.+)-(?P<num>\d+)-(?P<rate>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\.exp$")


@dataclass
class Run:
    backend: str
    num_prompts: int
    rate: float
    results: list[RequestResult]
    failures: list[FailedRequest] = field(default_factory=list)


def load_slo(workload: str, model: str, source: str = "paper",
             path: Path = SLO_CONFIG) -> tuple[float, float]:
    """(TTFT SLO, TPOT SLO) in seconds from configs/slo.toml; source "artifact" prefers the
    artifact's values where the paper and the artifact differ."""
    table = tomllib.loads(path.read_text())
    try:
        entry = table[workload][model]
    except KeyError:
        known = [f"{w}/{m}" for w, models in table.items() for m in models]
        raise KeyError(f"no SLO for workload {workload!r} and model {model!r} in {path}; known: "
                       f"{', '.join(known)}; or pass --ttft-slo and --tpot-slo") from None
    if source == "artifact":
        return entry.get("artifact_ttft", entry["ttft"]), entry.get("artifact_tpot", entry["tpot"])
    return entry["ttft"], entry["tpot"]


def load_runs(results_dir: str | Path) -> dict[str, list[Run]]:
    """backend -> runs sorted by rate, from files named <backend>-<num_prompts>-<rate>.exp."""
    runs: dict[str, list[Run]] = {}
    for path in sorted(Path(results_dir).glob("*.exp")):
        m = _EXP_NAME.match(path.name)
        if not m:
            print(f"skipping {path.name}: not <backend>-<num_prompts>-<rate>.exp", file=sys.stderr)
            continue
        run = Run(m["backend"], int(m["num"]), float(m["rate"]), load_exp(path), load_failures(path))
        runs.setdefault(run.backend, []).append(run)
    if not runs:
        raise FileNotFoundError(f"no <backend>-<num_prompts>-<rate>.exp files in {results_dir}")
    for backend_runs in runs.values():
        backend_runs.sort(key=lambda r: (r.rate, r.num_prompts))
    return runs


def run_attainment(run: Run, ttft_slo: float, tpot_slo: float) -> tuple[float, float, float]:
    return attainment(run.results, ttft_slo, tpot_slo, num_failed=len(run.failures))


def goodput(rates: Sequence[float], attainments: Sequence[float], target: float = TARGET) -> float:
    """Highest rate with attainment >= target, interpolating linearly across the first drop below
    it. 0 when even the lowest rate misses; the highest rate when none does (a lower bound)."""
    points = sorted(zip(rates, attainments))
    if not points or points[0][1] < target:
        return 0.0
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a1 < target:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0)
    return points[-1][0]


def min_slo_scale(results: Sequence[RequestResult], ttft_slo: float, tpot_slo: float,
                  num_failed: int = 0, target: float = TARGET) -> float:
    """Tightest factor s such that >= target of requests meet (s*TTFT SLO, s*TPOT SLO).

    Exact: each request meets a scale s iff s >= max(ftl/TTFT SLO, tpot/TPOT SLO), so the answer is
    the ceil(target*N)-th smallest of those values; inf if failures make the target unreachable.
    """
    needed = math.ceil(target * (len(results) + num_failed) - 1e-9)
    if needed == 0:
        return 0.0
    per_request = sorted(max(r.ftl / ttft_slo, r.tpot / tpot_slo) for r in results)
    return per_request[needed - 1] if needed <= len(per_request) else math.inf


def _curves(values: Sequence[tuple[float, float, float]]) -> dict[str, list[float]]:
    return {"both": [v[0] for v in values], "ttft": [v[1] for v in values],
            "tpot": [v[2] for v in values]}


def rate_view(runs: dict[str, list[Run]], num_gpus: dict[str, int], ttft_slo: float,
              tpot_slo: float) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Per-GPU rates and attainment curves for each backend."""
    rates = {b: [r.rate / num_gpus[b] for r in rs] for b, rs in runs.items()}
    curves = {b: _curves([run_attainment(r, ttft_slo, tpot_slo) for r in rs]) for b, rs in runs.items()}
    return rates, curves


def pick_run(backend_runs: Sequence[Run], per_gpu_rate: float, gpus: int) -> Run:
    """The run whose per-GPU rate is nearest to `per_gpu_rate`."""
    return min(backend_runs, key=lambda r: abs(r.rate / gpus - per_gpu_rate))


def slo_scale_grid(tightest: Sequence[float], points: int = 40) -> list[float]:
    """Scales from 0.1 up to past the loosest system's 90% point (at least 2)."""
    finite = [s for s in tightest if math.isfinite(s)]
    upper = max([2.0, *(1.25 * s for s in finite)])
    return [round(float(s), 4) for s in np.linspace(0.1, upper, points)]


def slo_scale_view(fixed: dict[str, Run], ttft_slo: float, tpot_slo: float,
                   scales: Sequence[float]):
    curves = {b: _curves([run_attainment(run, s * ttft_slo, s * tpot_slo) for s in scales])
              for b, run in fixed.items()}
    return {b: list(scales) for b in fixed}, curves


def baseline_backend(backends: Sequence[str]) -> str | None:
    return next((b for b in COLOCATED if b in backends), None)


def goodput_table(runs: dict[str, list[Run]], num_gpus: dict[str, int], fixed: dict[str, Run],
                  ttft_slo: float, tpot_slo: float) -> tuple[str, dict[str, dict[str, float]]]:
    """Markdown table and its numbers: per-GPU goodput and tightest SLO scale per backend, plus
    the disaggregated/colocated ratios when both kinds are present."""
    rates, curves = rate_view(runs, num_gpus, ttft_slo, tpot_slo)
    numbers = {}
    lines = [f"TTFT SLO {ttft_slo:g} s, TPOT SLO {tpot_slo:g} s, target {TARGET:.0%}", "",
             "| system | GPUs | goodput (req/s/GPU) | tightest SLO scale | at rate (req/s/GPU) |",
             "|---|---|---|---|---|"]
    for b in runs:
        gp = goodput(rates[b], curves[b]["both"])
        run = fixed[b]
        scale = min_slo_scale(run.results, ttft_slo, tpot_slo, len(run.failures))
        numbers[b] = {"goodput": gp, "slo_scale": scale, "rate": run.rate / num_gpus[b]}
        lines.append(f"| {b} | {num_gpus[b]} | {gp:.3f} | {scale:.3f} | {run.rate / num_gpus[b]:g} |")
    base = baseline_backend(list(runs))
    if DISAGGREGATED in numbers and base:
        d, c = numbers[DISAGGREGATED], numbers[base]
        rate_ratio = d["goodput"] / c["goodput"] if c["goodput"] > 0 else math.inf
        slo_ratio = c["slo_scale"] / d["slo_scale"] if d["slo_scale"] > 0 else math.inf
        numbers["ratio"] = {"goodput": rate_ratio, "slo_scale": slo_ratio}
        rate_text = (f"{rate_ratio:.2f}x goodput per GPU" if math.isfinite(rate_ratio) else
                     f"goodput ratio undefined ({base} never reached the target)")
        lines += ["", f"{DISAGGREGATED}/{base}: {rate_text}, {slo_ratio:.2f}x tighter SLO"]
    return "\n".join(lines), numbers


def parse_num_gpus(items: Sequence[str], backends: Sequence[str], model: str) -> dict[str, int]:
    """`backend=N` items over the paper's counts for `model`; 1 GPU for anything unnamed."""
    counts = dict(PAPER_NUM_GPUS.get(model, {}))
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--num-gpus {item!r}: write backend=N with N >= 1, e.g. distserve=3")
        counts[name] = int(value)
    if "vllm" in counts:   # the openai backend is how the vLLM baseline is usually measured
        counts.setdefault("openai", counts["vllm"])
    return {b: counts.get(b, 1) for b in backends}


def analyse(results_dir: str | Path, model: str, workload: str, out_dir: str | Path,
            ttft_slo: float | None = None, tpot_slo: float | None = None,
            num_gpus: Sequence[str] = (), slo_scale_rate: float | None = None,
            slo_source: str = "paper") -> dict:
    """Run the whole analysis; returns the table's numbers and the written file paths."""
    from serving.plots import attainment_figure, save_figure

    if ttft_slo is None or tpot_slo is None:
        default_ttft, default_tpot = load_slo(workload, model, slo_source)
        ttft_slo = default_ttft if ttft_slo is None else ttft_slo
        tpot_slo = default_tpot if tpot_slo is None else tpot_slo
    runs = load_runs(results_dir)
    gpus = parse_num_gpus(num_gpus, list(runs), model)
    if slo_scale_rate is None:   # a rate every backend measured near: the lowest of their maxima
        slo_scale_rate = min(rs[-1].rate / gpus[b] for b, rs in runs.items())
    fixed = {b: pick_run(rs, slo_scale_rate, gpus[b]) for b, rs in runs.items()}

    table, numbers = goodput_table(runs, gpus, fixed, ttft_slo, tpot_slo)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{model}-{workload}"
    table_path = out_dir / f"{stem}-goodput.md"
    table_path.write_text(f"# {model} {workload}\n\n{table}\n")
    print(table)

    fig = attainment_figure(f"{model} {workload}", rate_view(runs, gpus, ttft_slo, tpot_slo),
                            slo_scale_view(fixed, ttft_slo, tpot_slo, slo_scale_grid(
                                [numbers[b]["slo_scale"] for b in runs])),
                            {b: run.rate / gpus[b] for b, run in fixed.items()})
    figures = save_figure(fig, out_dir / stem)
    print(f"wrote {table_path}, " + ", ".join(str(p) for p in figures))
    return {"numbers": numbers, "table": table_path, "figures": figures}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", help="directory of <backend>-<num_prompts>-<rate>.exp files")
    p.add_argument("--model", required=True, help="e.g. opt-13b (picks SLOs and GPU counts)")
    p.add_argument("--workload", required=True, help="sharegpt, humaneval or longbench")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: configs/slo.toml)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: configs/slo.toml)")
    p.add_argument("--slo-source", choices=("paper", "artifact"), default="paper",
                   help="which of configs/slo.toml's values to use where the two differ")
    p.add_argument("--num-gpus", action="append", default=[], metavar="BACKEND=N",
                   help="GPUs a backend used, to get per-GPU rates (default: the paper's placements)")
    p.add_argument("--slo-scale-rate", type=float, default=None,
                   help="per-GPU rate for the SLO-scale view (default: lowest of each backend's top rate)")
    p.add_argument("--out", required=True, help="directory for the table and figures")
    args = p.parse_args(argv)
    analyse(args.results_dir, args.model, args.workload, args.out, args.ttft_slo, args.tpot_slo,
            args.num_gpus, args.slo_scale_rate, args.slo_source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
