"""Request-length workloads for the paper reproduction that have no local dataset.

- LongBench: the dataset is not available here, so `longbench_like` draws lengths that follow
  the artifact's preparation (prompts cut to min(2040 - answer, randint(1900, 2048)) tokens when
  the context is long enough) with DistServe's stated means, 1738.3 in / 90.7 out. Outputs are
  lognormal (sigma 1.2, most answers short, summaries long); a share of contexts is shorter than
  the cut and uniform in [256, 1900). The lognormal's median and that share are solved so that
  a large draw has exactly the stated means. Synthetic: it matches the means, not the shape.
- `fixed_lengths`: the paper's Figure 1 workload (every request 512 in / 64 out).
- `uniform_lengths`: lengths uniform in ranges (the rebalancing study's two halves).
"""
from __future__ import annotations

import functools
import numpy as np

from dsjax.eval.workloads import TestRequest

LONGBENCH_MEANS = (1738.3, 90.7)
_OUTPUT_SIGMA = 1.2
_OUTPUT_MAX = 1024
_SHORT_CONTEXT = (256, 1900)
_CUT = (1900, 2048)
_MAX_TOTAL = 2040
_SOLVE_DRAWS = 50_000


def _outputs(rng: np.random.Generator, n: int, median: float) -> np.ndarray:
    raw = rng.lognormal(np.log(median), _OUTPUT_SIGMA, n)
    return np.clip(np.rint(raw), 1, _OUTPUT_MAX).astype(int)


def _prompts(rng: np.random.Generator, outputs: np.ndarray, long_share: float) -> np.ndarray:
    n = len(outputs)
    cut = np.minimum(_MAX_TOTAL - outputs, rng.integers(_CUT[0], _CUT[1] + 1, n))
    short = np.minimum(rng.integers(*_SHORT_CONTEXT, n), _MAX_TOTAL - outputs)
    return np.where(rng.random(n) < long_share, cut, short)


def _bisect(f, lo: float, hi: float, target: float) -> float:
    """x in [lo, hi] with f(x) = target, for increasing f."""
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


@functools.cache
def _longbench_params() -> tuple[float, float]:
    """(output median, share of long contexts) giving the stated means on a fixed large draw."""
    mean_out = lambda m: _outputs(np.random.default_rng(1), _SOLVE_DRAWS, m).mean()
    median = _bisect(mean_out, 1.0, 500.0, LONGBENCH_MEANS[1])
    outputs = _outputs(np.random.default_rng(1), _SOLVE_DRAWS, median)
    mean_in = lambda q: _prompts(np.random.default_rng(2), outputs, q).mean()
    return median, _bisect(mean_in, 0.0, 1.0, LONGBENCH_MEANS[0])


def longbench_like(num: int, seed: int = 0) -> list[TestRequest]:
    median, long_share = _longbench_params()
    rng = np.random.default_rng(seed)
    outputs = _outputs(rng, num, median)
    prompts = _prompts(rng, outputs, long_share)
    return [TestRequest("", int(p), int(o)) for p, o in zip(prompts, outputs)]


def fixed_lengths(num: int, prompt_len: int, output_len: int) -> list[TestRequest]:
    return [TestRequest("", prompt_len, output_len)] * num


def uniform_lengths(num: int, prompt: tuple[int, int], output: tuple[int, int],
                    seed: int = 0) -> list[TestRequest]:
    """Lengths uniform in [lo, hi] each."""
    rng = np.random.default_rng(seed)
    return [TestRequest("", int(p), int(o)) for p, o in
            zip(rng.integers(prompt[0], prompt[1] + 1, num), rng.integers(output[0], output[1] + 1, num))]
