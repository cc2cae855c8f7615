"""Request arrival times, drawn exactly as DistServe's benchmark client draws them.

One definition for the load client (serving/bench.py), the in-process replay (dsjax/replay.py)
and the simulator, so a simulated run sees the same arrivals as a measured one.
"""
from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num: int, rate: float, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (s, from the start) of `num` requests: gamma gaps with shape 1/cv^2 and scale
    cv^2/rate (cv = 1 is Poisson), drawn as the artifact does (np.random seeded with `seed`).
    Request i waits for the first i gaps; rate inf or 0 sends everything at once."""
    if rate in (0.0, math.inf):
        return np.zeros(num)
    gaps = np.random.RandomState(seed).gamma(1.0 / (cv * cv), cv * cv / rate, size=num)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if num else np.zeros(0)
