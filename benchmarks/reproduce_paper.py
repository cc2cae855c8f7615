"""The paper's Figures 8 and 9 on the simulator, then the same question asked on equal kernels.

    python benchmarks/reproduce_paper.py            # full run: minutes on 2 cores
    python benchmarks/reproduce_paper.py --quick    # CI-sized: one case, fewer requests and rates

1. Paper comparison, the artifact's settings: DistServe at the paper's placements on DistServe's
   A100 profile against vLLM at the artifact's TP (1 / 4 / 8) on vLLM's profile, for OPT-13B,
   66B, 175B on ShareGPT, OPT-66B on HumanEval and LongBench (synthetic lengths, see
   paper_workloads.py). OPT-175B has no profile: scaled from 66B and 13B (latency_model.scale_model).
2. Equal kernels: on DistServe's profile, the placement search's best colocated and chunked
   placements (and its best disaggregated one) for the same cases, drawn on the same figures.
3. Beyond the paper: where, if anywhere, the search itself picks disaggregation.
4. The host-overhead ablation on the issue's OPT-13B case, and the rebalancing study.

Writes docs/img/fig8-attainment-vs-rate.png, docs/img/fig9-attainment-vs-slo-scale.png and the
tables below the marker in docs/reproduction.md (--quick writes under /tmp unless --out is given).
Goodputs are bisected to 2% (dsjax.eval.placement_search.max_rate); the curves are simulated on a
rate grid; the SLO-scale view runs every system at the artifact's per-GPU rate for the case.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from dsjax.eval.latency_model import StepOverhead, load_profile, scale_model  # noqa: E402
from dsjax.eval.placement_search import SLO, Searcher, search  # noqa: E402
from dsjax.eval.simulator import Parallelism, simulate  # noqa: E402
from dsjax.eval.units import Unit  # noqa: E402
from dsjax.eval.workloads import get_dataset  # noqa: E402
from paper_workloads import fixed_lengths, longbench_like  # noqa: E402
from serving.analysis import Run, load_slo, min_slo_scale, rate_view, slo_scale_view  # noqa: E402

MARKER = "<!-- reproduce_paper.py writes below this line -->"
VLLM_PROFILE = ROOT / "configs" / "profiles" / "profiler-a100-80g.vllm.json"
DISAGG = lambda p, d, nodes=1: Unit("disaggregated", p, d, 1, 1, affinity="low", nodes=nodes)


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    model: str
    workload: str                      # sharegpt, humaneval, longbench, or a synthetic name
    slo: tuple[float, float]           # TTFT, TPOT seconds
    cluster: tuple[int, int]           # nodes x GPUs per node for the search
    distserve: Unit | None = None      # the paper's placement (paper cases only)
    vllm_tp: int = 0                   # the artifact's vLLM TP (paper cases only)
    slo_view_rate: float = 0.0         # per-GPU rate of the SLO-scale view (the artifact's)
    paper: tuple[str, str] = ("", "")  # the paper's ratios over vLLM: rate, SLO
    cv: float = 1.0
    note: str = ""


def artifact_slo(workload: str, model: str) -> tuple[float, float]:
    return load_slo(workload, model, "artifact")


CHATBOT = ("2.0-4.6x (chatbot)", "1.8-3.2x (chatbot)")
PAPER_CASES = [
    Case("opt-13b-sharegpt", "opt-13b", "sharegpt", artifact_slo("sharegpt", "opt-13b"), (1, 8),
         DISAGG(Parallelism(2, 1), Parallelism(1, 1)), 1, 1.5, CHATBOT),
    Case("opt-66b-sharegpt", "opt-66b", "sharegpt", artifact_slo("sharegpt", "opt-66b"), (1, 8),
         DISAGG(Parallelism(4, 1), Parallelism(2, 2)), 4, 0.25, CHATBOT),
    Case("opt-175b-sharegpt", "opt-175b", "sharegpt", artifact_slo("sharegpt", "opt-175b"), (4, 8),
         DISAGG(Parallelism(3, 3), Parallelism(4, 3), nodes=3), 8, 0.125, CHATBOT),
    Case("opt-66b-humaneval", "opt-66b", "humaneval", artifact_slo("humaneval", "opt-66b"), (1, 8),
         DISAGG(Parallelism(4, 1), Parallelism(2, 2)), 4, 0.875, ("5.7x", "1.4x")),
    Case("opt-66b-longbench", "opt-66b", "longbench", artifact_slo("longbench", "opt-66b"), (1, 8),
         DISAGG(Parallelism(4, 1), Parallelism(2, 2)), 4, 0.375, ("4.3x", "12.6x")),
]
# Beyond the paper, on equal kernels: the search decides.
BEYOND_CASES = [
    Case("opt-13b-sharegpt-1x4", "opt-13b", "sharegpt", (0.2, 0.1), (1, 4), note="the issue's case"),
    Case("opt-66b-sharegpt-paper-slo", "opt-66b", "sharegpt", load_slo("sharegpt", "opt-66b"), (1, 8),
         note="Table 1's SLO (2.5 s / 0.15 s)"),
    Case("opt-13b-fig1", "opt-13b", "fig1", (0.4, 0.04), (1, 4),
         note="Figure 1: 512 in / 64 out, TTFT 0.4 s, TPOT 0.04 s"),
    Case("opt-13b-sharegpt-tight-tpot", "opt-13b", "sharegpt", (0.25, 0.04), (1, 8), note="TPOT 0.04 s"),
    Case("opt-13b-longbench", "opt-13b", "longbench", (1.5, 0.05), (1, 8),
         note="long prompts, TTFT 1.5 s, TPOT 0.05 s"),
    Case("opt-13b-sharegpt-cv2", "opt-13b", "sharegpt", (0.25, 0.1), (1, 8), cv=2.0, note="bursty, cv 2"),
    Case("opt-13b-sharegpt-cv4", "opt-13b", "sharegpt", (0.25, 0.1), (1, 8), cv=4.0, note="bursty, cv 4"),
    Case("opt-175b-humaneval", "opt-175b", "humaneval", (0.5, 0.1), (4, 8), note="TTFT 0.5 s, TPOT 0.1 s"),
]
# The measurements (ours before this change vs DistServe's simulator; OPT-13B ShareGPT,
# 1 x 4, 0.2 s / 0.1 s): (label, unit, vLLM profile?, DistServe's simulator per GPU).
ABLATION = [
    ("disaggregated prefill TP2 -> decode TP1", DISAGG(Parallelism(2, 1), Parallelism(1, 1)), False, 1.94),
    ("colocated TP2", Unit("colocated", Parallelism(2, 1)), False, 2.39),
    ("colocated TP4", Unit("colocated", Parallelism(4, 1)), False, 2.55),
    ("colocated TP4, vLLM's profile", Unit("colocated", Parallelism(4, 1)), True, 1.27),
]
DISTSERVE_OVERHEAD = StepOverhead(2.0, 0.0001)


# ---------------------------------------------------------------- inputs

def profiles(model: str):
    """(DistServe's profile, vLLM's profile) for `model`; OPT-175B scaled from 66B and 13B."""
    def load(path):
        if model != "opt-175b":
            return load_profile(path, model)
        return scale_model(load_profile(path, "opt-66b"), load_profile(path, "opt-13b"), model)
    return load(None), load(VLLM_PROFILE)


def requests(workload: str, num: int):
    if workload == "longbench":
        return longbench_like(num)
    if workload == "fig1":
        return fixed_lengths(num, 512, 64)
    return get_dataset(workload).sample(num, seed=0)


# ---------------------------------------------------------------- one system on one case

@dataclasses.dataclass
class System:
    name: str
    unit: Unit
    searcher: Searcher                 # its model (profile) and the case's requests and SLO
    goodput: float | None = None       # req/s of the unit

    @property
    def per_gpu(self) -> float:
        return (self.goodput or 0.0) / self.unit.num_gpus

    def measure(self) -> "System":
        if self.goodput is None:
            self.goodput = self.searcher.unit_goodput(self.unit) or 0.0
        return self

    def run(self, per_gpu_rate: float) -> Run:
        rate = per_gpu_rate * self.unit.num_gpus
        reqs = self.searcher.requests_for(rate)
        sims = simulate(self.searcher.model, reqs, rate, self.unit.sim_config(self.searcher.base),
                        cv=self.searcher.cv)
        return Run(self.name, len(reqs), rate, [s.to_result() for s in sims])


def systems_for(case: Case, num: int, found) -> list[System]:
    ds_model, vllm_model = profiles(case.model)
    reqs, slo = requests(case.workload, num), SLO(*case.slo)
    ds, vllm = Searcher(ds_model, reqs, slo, cv=case.cv), Searcher(vllm_model, reqs, slo, cv=case.cv)
    out = [System("distserve", case.distserve, ds).measure(),
           System("vllm", Unit("colocated", Parallelism(case.vllm_tp, 1)), vllm).measure()]
    for mode in ("colocated", "chunked"):
        part = found.placements[mode].parts[0]
        out.append(System(f"{mode}-best", part.unit, ds, part.goodput))
    return out


# ---------------------------------------------------------------- figures

def draw(panels: list[dict], out_dir: Path) -> list[Path]:
    from serving.plots import plot_attainment_vs_rate, plot_attainment_vs_slo_scale, plt
    paths = []
    for i, (name, key, draw_fn, xlabel) in enumerate((
            ("fig8-attainment-vs-rate", "rate_view", plot_attainment_vs_rate, "Per-GPU rate (req/s)"),
            ("fig9-attainment-vs-slo-scale", "slo_view", plot_attainment_vs_slo_scale, "SLO scale"))):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            draw_fn(ax, *panel[key], kinds=("both",))
            ax.set_title(panel["titles"][i], fontsize=9)
            ax.set_xlabel(xlabel)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, [l.replace(" (Both)", "") for l in labels], loc="lower center",
                   ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.16))
        path = out_dir / f"{name}.png"
        fig.savefig(path, bbox_inches="tight", dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def curves(case: Case, systems: list[System], rate_points: int) -> dict:
    """Attainment vs per-GPU rate on a grid up to 1.3x the best goodput, and vs SLO scale at
    the artifact's rate; also the tightest SLO scale of each system."""
    top = max(s.per_gpu for s in systems) * 1.3 or case.slo_view_rate * 2
    grid = [top * (i + 1) / rate_points for i in range(rate_points)]
    runs = {s.name: [s.run(r) for r in grid] for s in systems}
    gpus = {s.name: s.unit.num_gpus for s in systems}
    fixed = {s.name: s.run(case.slo_view_rate) for s in systems}
    ttft, tpot = case.slo
    tightest = {n: min_slo_scale(r.results, ttft, tpot) for n, r in fixed.items()}
    finite = [t for t in tightest.values() if math.isfinite(t)]
    scales = [round(0.1 + i * (max(finite + [2.0]) * 1.2 - 0.1) / 30, 4) for i in range(31)]
    rv = rate_view(runs, gpus, ttft, tpot)
    title = f"{case.model} {case.workload}, SLO {ttft:g} s / {tpot:g} s"
    return {"rate_view": rv, "slo_view": slo_scale_view(fixed, ttft, tpot, scales),
            "tightest": tightest, "peak": {n: max(rv[1][n]["both"]) for n in runs},
            "titles": (title, f"{title}, {case.slo_view_rate:g} req/s/GPU")}


# ---------------------------------------------------------------- tables

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "∞"


def paper_table(rows: list[tuple[Case, list[System], dict]]) -> str:
    lines = ["| case | SLO (s) | DistServe placement | DistServe req/s/GPU | vLLM TP | vLLM req/s/GPU "
             "(best attainment) | rate ratio: ours | paper | tightest SLO scale DistServe / vLLM "
             "| SLO ratio: ours | paper |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, systems, c in rows:
        ds, vllm = systems[0], systems[1]
        t = c["tightest"]
        lines.append(f"| {case.key} | {case.slo[0]:g} / {case.slo[1]:g} | {ds.unit.describe()} | "
                     f"{ds.per_gpu:.3f} | {case.vllm_tp} | {vllm.per_gpu:.3f} ({c['peak']['vllm']:.0%}) | "
                     f"{ratio(ds.per_gpu, vllm.per_gpu)} | {case.paper[0]} | {t['distserve']:.2f} / "
                     f"{t['vllm']:.2f} | {ratio(t['vllm'], t['distserve'])} | {case.paper[1]} |")
    return "\n".join(lines)


def equal_kernel_table(rows: list[tuple[Case, list[System], dict]]) -> str:
    lines = ["| case | DistServe (paper placement) /GPU | colocated best | /GPU | chunked best | /GPU "
             "| DistServe / best other | tightest SLO scale DistServe / colocated / chunked |",
             "|---|---|---|---|---|---|---|---|"]
    for case, systems, c in rows:
        ds, _, col, chk = systems
        t = c["tightest"]
        lines.append(f"| {case.key} | {ds.per_gpu:.3f} | {col.unit.describe()} | {col.per_gpu:.3f} | "
                     f"{chk.unit.describe()} | {chk.per_gpu:.3f} | "
                     f"{ratio(ds.per_gpu, max(col.per_gpu, chk.per_gpu))} | "
                     f"{t['distserve']:.2f} / {t['colocated-best']:.2f} / {t['chunked-best']:.2f} |")
    return "\n".join(lines)


def search_table(rows: list[tuple[Case, object]]) -> str:
    lines = ["| case | SLO (s) | cluster | disaggregated | /GPU | colocated | /GPU | chunked | /GPU "
             "| disaggregated / best other | search s (CPU s) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, found in rows:
        p = found.placements
        cell = lambda m: (p[m].describe(), f"{p[m].per_gpu:.3f}") if m in p else ("none", "0")
        d, c, k = cell("disaggregated"), cell("colocated"), cell("chunked")
        other = max(float(c[1]), float(k[1]))
        lines.append(f"| {case.key}{'' if case.cv == 1 else f' (cv {case.cv:g})'} | {case.slo[0]:g} / "
                     f"{case.slo[1]:g} | {case.cluster[0]}x{case.cluster[1]} | {d[0]} | {d[1]} | {c[0]} | "
                     f"{c[1]} | {k[0]} | {k[1]} | {ratio(float(d[1]), other)} | "
                     f"{found.elapsed_s:.0f} ({found.cpu_s:.0f}) | {case.note} |")
    return "\n".join(lines)


def ablation_table(num: int) -> str:
    reqs = requests("sharegpt", num)
    lines = ["| OPT-13B ShareGPT 1x4, 0.2 s / 0.1 s | ours, no overhead | ours, 2 ms + 0.0001 ms/token "
             "| DistServe's simulator (issue 12) |", "|---|---|---|---|"]
    for label, unit, vllm, theirs in ABLATION:
        ds_model, vllm_model = profiles("opt-13b")
        model = vllm_model if vllm else ds_model
        cells = []
        for m in (model, model.with_overhead(DISTSERVE_OVERHEAD)):
            g = Searcher(m, reqs, SLO(0.2, 0.1)).unit_goodput(unit) or 0.0
            cells.append(f"{g / unit.num_gpus:.2f}")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {theirs:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def run_search(case: Case, num: int, jobs: int):
    ds_model, _ = profiles(case.model)
    return search(ds_model, requests(case.workload, num), SLO(*case.slo),
                  ("disaggregated", "colocated", "chunked"), *case.cluster, cv=case.cv,
                  progress=False, jobs=jobs)


def write_doc(doc: Path, sections: Sequence[tuple[str, str]]) -> None:
    text = doc.read_text() if doc.exists() else f"# Reproduction\n\n{MARKER}\n"
    head = text.split(MARKER)[0]
    body = "\n\n".join(f"### {title}\n\n{table}" for title, table in sections)
    doc.write_text(f"{head}{MARKER}\n\n{body}\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/reproduce_paper.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one case, 60 requests, 4 rates: a CI check")
    p.add_argument("--out", default=None, help="figures directory (default docs/img; --quick: /tmp)")
    p.add_argument("--doc", default=None, help="markdown file for the tables (default docs/reproduction.md)")
    p.add_argument("--num-prompts", type=int, default=None, help="sampled requests per simulation (300)")
    p.add_argument("--jobs", type=int, default=2, help="processes per placement search")
    args = p.parse_args(argv)
    quick_dir = Path("/tmp/reproduce_paper")
    out = Path(args.out) if args.out else (quick_dir if args.quick else ROOT / "docs" / "img")
    doc = Path(args.doc) if args.doc else (quick_dir / "reproduction.md" if args.quick
                                           else ROOT / "docs" / "reproduction.md")
    out.mkdir(parents=True, exist_ok=True)
    doc.parent.mkdir(parents=True, exist_ok=True)
    num = args.num_prompts or (60 if args.quick else 300)
    paper_cases, beyond = (PAPER_CASES[:1], []) if args.quick else (PAPER_CASES, BEYOND_CASES)
    started = time.perf_counter()

    paper_rows, search_rows = [], []
    for case in paper_cases:
        found = run_search(case, num, args.jobs)
        search_rows.append((case, found))
        systems = systems_for(case, num, found)
        paper_rows.append((case, systems, curves(case, systems, 4 if args.quick else 10)))
        print(f"{case.key}: " + ", ".join(f"{s.name} {s.per_gpu:.3f}" for s in systems)
              + f" req/s per GPU ({time.perf_counter() - started:.0f} s)", flush=True)
    figures = draw([c for _, _, c in paper_rows], out)
    for case in beyond:
        search_rows.append((case, run_search(case, num, args.jobs)))
        print(f"{case.key}: {search_rows[-1][1].table().splitlines()[1]} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    from rebalance_study import rebalance_table
    sections = [
        ("Paper comparison (artifact settings: DistServe's profile vs vLLM's profile)", paper_table(paper_rows)),
        ("Equal kernels (DistServe's profile for every system)", equal_kernel_table(paper_rows)),
        ("The search on equal kernels: paper settings and beyond", search_table(search_rows)),
        ("Host overhead ablation", ablation_table(num)),
        ("Dynamic prefill:decode rebalancing", rebalance_table(quick=args.quick)),
    ]
    write_doc(doc, sections)
    print(f"wrote {', '.join(map(str, figures))} and {doc} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
