"""Does disaggregation win more often when the KV cache is 4-8x smaller? The placement search's
mode choice for grouped-query models beside the OPT sizes of the paper, on equal kernels.

    python benchmarks/gqa_mode_choice.py          # writes its section of docs/reproduction.md

LLaMA-3.1-8B and -70B have no A100 profile: their step times are DistServe's OPT-13B (for 8B)
and OPT-66B (for 70B) coefficients scaled term by term by FLOPs, parameters and KV bytes per
token (dsjax.eval.latency_model.scale_by_flops), so the table is an estimate on DistServe's
kernels, labelled as such. Each row runs the search over disaggregated, colocated and chunked
placements on ShareGPT at the OPT size's artifact SLO, on one node of 8 A100s.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from dsjax.eval.latency_model import load_profile, scale_by_flops  # noqa: E402
from dsjax.eval.placement_search import SLO, search  # noqa: E402
from dsjax.eval.workloads import get_dataset  # noqa: E402
from dsjax.models.registry import config_from_name  # noqa: E402
from serving.analysis import load_slo  # noqa: E402

BEGIN = "<!-- gqa_mode_choice.py writes from here -->"
END = "<!-- gqa_mode_choice.py writes up to here -->"
# reproduce_paper.py rewrites everything after its marker: this section stays before it.
PAPER_MARKER = "<!-- reproduce_paper.py writes below this line -->"
# (model, the OPT profile it runs on or is scaled from, that OPT size's SLO)
CASES = [("opt-13b", "opt-13b"), ("llama-3.1-8b", "opt-13b"),
         ("opt-66b", "opt-66b"), ("llama-3.1-70b", "opt-66b")]


def row(model: str, reference: str, reqs, jobs: int) -> str:
    base = load_profile(None, reference)
    latency = base if model == reference else scale_by_flops(base, model)
    slo = SLO(*load_slo("sharegpt", reference))
    started = time.perf_counter()
    found = search(latency, reqs, slo, ("disaggregated", "colocated", "chunked"), 1, 8,
                   progress=False, jobs=jobs)
    p = found.placements
    cell = lambda m: (p[m].describe(), p[m].per_gpu) if m in p else ("none", 0.0)  # noqa: E731
    d, c, k = cell("disaggregated"), cell("colocated"), cell("chunked")
    config = config_from_name(model)
    kv_kib = config.kv_bytes_per_token(2) / 1024
    source = "measured" if model == reference else f"scaled from {reference}"
    winner = max((("disaggregated", d[1]), ("colocated", c[1]), ("chunked", k[1])),
                 key=lambda x: x[1])[0]
    print(f"{model}: {winner} ({time.perf_counter() - started:.0f} s)", flush=True)
    return (f"| {model} ({source}) | {kv_kib:.0f} | {slo.ttft:g} / {slo.tpot:g} | {d[0]} | "
            f"{d[1]:.3f} | {c[0]} | {c[1]:.3f} | {k[0]} | {k[1]:.3f} | "
            f"{d[1] / max(c[1], k[1], 1e-9):.2f}x | {winner} |")


def write_section(doc: Path, begin: str, end: str, body: str) -> None:
    """Replace the text between a script's markers in `doc` (or insert them before the part
    reproduce_paper.py rewrites, which would erase anything after its marker)."""
    text = doc.read_text()
    section = f"{begin}\n\n{body}\n\n{end}"
    if begin in text:
        before, rest = text.split(begin)
        text = before + section + rest.split(end, 1)[1]
    else:
        before, after = text.split(PAPER_MARKER)
        text = f"{before}{section}\n\n{PAPER_MARKER}{after}"
    doc.write_text(text)


def main() -> int:
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    reqs = get_dataset("sharegpt").sample(300, seed=0)
    lines = ["| model (profile) | KV KiB/token (fp16) | SLO (s) | disaggregated | /GPU | "
             "colocated | /GPU | chunked | /GPU | disaggregated / best other | search picks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(model, reference, reqs, jobs=2) for model, reference in CASES]
    write_section(ROOT / "docs" / "reproduction.md", BEGIN, END, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
