"""A latency model fitted from the engine's own steps, not from timed `ModelRunner` calls.

The runner-level profile (dsjax.eval.profiler) times kernels and the runner's input packing.
A served step costs more: the router's and workers' messages, scheduling and token delivery
(and under a pipeline the async token-selection program) run between two steps; with 1-2 ms
steps on a CPU that host work is most of the step (docs/validation.md, run 6: real decode
steps 1.5-3.2x the profile). So here the engine itself runs a calibration workload, every
step is recovered from what the engine reports per request, and DistServe's step model is
fitted to those steps:

    prefill ms = a + b*sum(len) + c*sum(len^2)     (a step: requests sharing one
                                                    context_begin/context_end pair)
    decode ms  = a + b*sum(ctx) + c*batch          (a step: tokens sharing one timestamp,
                                                    timed from the step before it)

The host work lands in the intercepts and per-row terms, so the fitted model charges no
separate overhead. In disaggregated mode the decode model is fitted to the steps that started
with nothing beside them, and what a KV pull in flight or another instance's prefill step
adds to a step is fitted apart (fit_step_costs; the simulator's kv_pull_step_cost_s and
decode_cost_beside_prefill_s). Coefficients are fitted with all three kept >= 0 (the best
non-negative subset by squared error), so no shape ever gets a negative time, and fitted
again without the outliers of the first fit (compiles, scheduling stalls).
"""
from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from typing import Sequence

import numpy as np

from dsjax.eval.latency_model import DEFAULT_BS_THRESHOLD, LatencyModel, StepCoeffs, StepOverhead

# Fewer steps than this in a phase: keep the runner profile's coefficients for it.
MIN_STEPS = 8
# Steps further than this many robust standard deviations off the first fit are stalls.
OUTLIER_MADS = 4.0


def _event_times(result) -> dict[str, float]:
    return {e["event_type"]: e["timestamp"] for e in result.lifecycle_events or []}


def _prefill_groups(results) -> dict[tuple[float, float], list[int]]:
    """(context_begin, context_end) -> the prompt lengths of the requests stamped so."""
    groups = defaultdict(list)
    for r in results:
        ev = _event_times(r)
        if "context_begin" in ev and "context_end" in ev:
            groups[(ev["context_begin"], ev["context_end"])].append(r.prompt_len)
    return groups


def prefill_batches(results) -> list[tuple[list[int], float]]:
    """Prefill steps recovered from lifecycle events: requests sharing one
    (context_begin, context_end) pair ran in one batch. Returns [(prompt lens, seconds)]."""
    return [(lens, end - begin) for (begin, end), lens in _prefill_groups(results).items()]


def prefill_step_times(results) -> list[tuple[float, float]]:
    """Each prefill step's (start, end)."""
    return list(_prefill_groups(results))


def decode_step_spans(results) -> list[tuple[list[int], float, float]]:
    """Decode steps recovered from token timestamps: an instance stamps every token of one
    step with the same time. A step runs from the previous stamp of any step to its own,
    counted only when one of its requests had its previous token at that previous stamp
    (so the instance was busy with this batch, not idle). A migrated request's first token
    is its prefill instance's stamp, not a decode step's: it is left out, so the gap after
    it (the hand-off: the pull and a step) is no step, and no decode step is timed from it.
    Returns [(context lens, start, end)]."""
    at = defaultdict(list)   # stamp -> [(request index, token index)]
    for i, r in enumerate(results):
        first = 1 if "migration_begin" in _event_times(r) else 0
        for k, t in enumerate(r.token_timestamps[first:], start=first):
            at[t].append((i, k))
    stamps = sorted(at)
    steps = []
    for prev, t in zip(stamps, stamps[1:]):
        rows = [(i, k) for i, k in at[t] if k > 0]
        if not rows:
            continue
        if any(results[i].token_timestamps[k - 1] == prev for i, k in rows):
            steps.append(([results[i].prompt_len + k for i, k in rows], prev, t))
    return steps


def _union(intervals) -> list[tuple[float, float]]:
    """Sorted disjoint (start, end) intervals covering `intervals`."""
    merged: list[list[float]] = []
    for begin, end in sorted(intervals):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(a, b) for a, b in merged]


def pull_windows(results) -> list[tuple[float, float]]:
    """Where some KV pull was in flight: the union of the requests' migration_begin ..
    migration_end, as sorted disjoint (start, end) intervals."""
    return _union((ev["migration_begin"], ev["migration_end"])
                  for ev in map(_event_times, results)
                  if "migration_begin" in ev and "migration_end" in ev)


def prefill_windows(results) -> list[tuple[float, float]]:
    """Where some prefill step ran (context_begin .. context_end), sorted and disjoint."""
    return _union(prefill_step_times(results))


def _during(spans, windows) -> list[bool]:
    """For each (ctx, start, end) span: whether it starts inside one of the sorted disjoint
    windows (as the simulator charges a step by what runs when it starts)."""
    ends = [b for _, b in windows]
    out = []
    for _, start, _ in spans:
        k = bisect.bisect_right(ends, start)
        out.append(k < len(windows) and windows[k][0] <= start)
    return out


def decode_step_kinds(results) -> list[tuple[list[int], float, float, bool, bool]]:
    """decode_step_spans with, for each step, whether a KV pull was in flight when it started
    and whether a prefill step of another instance was running then (disaggregated mode:
    every prefill step is another instance's)."""
    spans = decode_step_spans(results)
    migrated = any("migration_begin" in _event_times(r) for r in results)
    pulls = _during(spans, pull_windows(results))
    beside = _during(spans, prefill_windows(results)) if migrated else [False] * len(spans)
    return [(*span, p, q) for span, p, q in zip(spans, pulls, beside)]


def decode_steps(results, alone: bool = False) -> list[tuple[list[int], float]]:
    """decode_step_spans as [(context lens, seconds)]; with `alone`, only the steps that
    started while no KV pull was in flight and no other instance's prefill step ran."""
    return [(ctx, end - start) for ctx, start, end, pull, beside in decode_step_kinds(results)
            if not (alone and (pull or beside))]


def fit_step_costs(results, model: LatencyModel, tp: int = 1) -> tuple[float, float]:
    """(seconds a decode step takes beyond `model` when it starts while a KV pull is in
    flight, seconds when it starts while another instance runs a prefill step): the median
    excess (real minus model) of each kind of step less that of the steps with neither
    (each >= 0; 0 without MIN_STEPS of a kind). On a CPU the pull's work (its waiter thread
    receiving, landing the pages between steps, the source's sending) and, with the
    instances in one process (`uni`), the prefill's host work take the cores and the
    interpreter from the step loop: about a millisecond a step each with opt-tiny
    (docs/validation.md, run 14), steady across rates where a factor on the step was not.
    The pulls are the whole run's (results carry no instance), as the simulator charges
    them to their destination: exact with one decode instance, as validation runs."""
    excess = defaultdict(list)
    for ctx, start, end, pull, beside in decode_step_kinds(results):
        excess[pull, beside].append((end - start) * 1e3 - model.decode_ms(ctx, tp))
    if len(excess[False, False]) < MIN_STEPS:
        return 0.0, 0.0
    base = float(np.median(excess[False, False]))
    cost = lambda kind: max(0.0, float(np.median(excess[kind])) - base) / 1e3 \
        if len(excess[kind]) >= MIN_STEPS else 0.0  # noqa: E731
    return cost((True, False)), cost((False, True))


def pull_seconds(result) -> float | None:
    """A request's KV pull from its lifecycle events, migration_begin to migration_end (the
    pull, and the decode loop picking its arrival up); None if it did not migrate."""
    ev = _event_times(result)
    if "migration_begin" in ev and "migration_end" in ev:
        return ev["migration_end"] - ev["migration_begin"]
    return None


def migration_samples(results, kv_bytes_per_token: int) -> list[tuple[int, float]]:
    """KV pulls recovered from lifecycle events: (bytes, seconds) per request that migrated,
    bytes being its prompt's KV (the pages a pull moves)."""
    return [(r.prompt_len * kv_bytes_per_token, s) for r in results
            if (s := pull_seconds(r)) is not None]


def fit_link(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(latency s, bytes/s) of seconds = latency + bytes / bandwidth fitted to KV pulls, both
    terms >= 0; an infinite bandwidth where the bytes explain none of the time. (0, inf)
    without MIN_STEPS pulls."""
    if len(samples) < MIN_STEPS:
        return 0.0, float("inf")
    latency, per_byte = trimmed_nonnegative_fit([(1.0, b) for b, _ in samples],
                                                [s for _, s in samples])
    return latency, (1.0 / per_byte if per_byte > 0 else float("inf"))


def first_gap(result) -> float | None:
    """Seconds from a request's first token (its prefill's end) to its second (its first
    decode step's end): in disaggregated mode, the hand-off between the instances and one
    decode step. Both the engine and the simulator stamp these the same way (their
    migration events are stamped at different points of a pull). None with one token."""
    ts = result.token_timestamps
    return ts[1] - ts[0] if len(ts) >= 2 else None


def fit_pull_overhead(real, simulated) -> float:
    """Seconds a real hand-off takes beyond the simulated one: the median, over the requests
    of both runs (the same requests and arrivals, in the same order) that have a second token,
    of the difference of their first gaps (first_gap). What the simulator's link and step-end
    waits leave out: the instances' messages around a pull. Negative where the simulated
    hand-offs run longer; 0 without MIN_STEPS such requests."""
    diffs = [a - b for a, b in zip(map(first_gap, real), map(first_gap, simulated), strict=True)
             if a is not None and b is not None]
    return float(np.median(diffs)) if len(diffs) >= MIN_STEPS else 0.0


def nonnegative_lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> tuple[float, ...]:
    """Least squares with every coefficient >= 0: the best, by squared error, of the plain
    solutions over each subset of columns that come out non-negative (exact for 3 columns,
    where the optimum lies on such a subset)."""
    x, y = np.asarray(rows, float), np.asarray(ys, float)
    best, best_sse = np.zeros(x.shape[1]), float(y @ y)
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            full = np.zeros(x.shape[1])
            full[list(cols)] = sol
            sse = float(((x @ full - y) ** 2).sum())
            if sse < best_sse:
                best, best_sse = full, sse
    return tuple(float(v) for v in best)


def trimmed_nonnegative_fit(rows: Sequence[Sequence[float]], ys: Sequence[float],
                            cutoff: float = OUTLIER_MADS) -> tuple[float, ...]:
    """nonnegative_lstsq, refitted without the points whose residual lies more than `cutoff`
    robust standard deviations (1.4826 x the median absolute residual) from the median: a
    compile or a scheduling stall during calibration describes no typical step, and a few
    such seconds-long steps among millisecond ones would otherwise set the intercept."""
    x, y = np.asarray(rows, float), np.asarray(ys, float)
    coeffs = nonnegative_lstsq(x, y)
    residual = y - x @ np.asarray(coeffs)
    centre = np.median(residual)
    spread = 1.4826 * np.median(np.abs(residual - centre))
    keep = np.abs(residual - centre) <= cutoff * spread
    if spread > 0 and x.shape[1] <= keep.sum() < len(y):
        coeffs = nonnegative_lstsq(x[keep], y[keep])
    return coeffs


def fit_engine_coeffs(prefills: Sequence[tuple[Sequence[int], float]],
                      decodes: Sequence[tuple[Sequence[int], float]],
                      fallback: StepCoeffs) -> StepCoeffs:
    """StepCoeffs (ms) from engine steps [(lengths, seconds)]; a phase with under MIN_STEPS
    steps keeps `fallback`'s coefficients. Decode gets one fit for small and large batches
    alike: a calibration run rarely has enough steps on both sides of the threshold."""
    prefill = fallback.prefill
    if len(prefills) >= MIN_STEPS:
        prefill = trimmed_nonnegative_fit([(1.0, sum(lens), sum(n * n for n in lens))
                                           for lens, _ in prefills],
                                          [s * 1e3 for _, s in prefills])
    decode = fallback.decode_small
    if len(decodes) >= MIN_STEPS:
        decode = trimmed_nonnegative_fit([(1.0, sum(ctx), len(ctx)) for ctx, _ in decodes],
                                         [s * 1e3 for _, s in decodes])
    return StepCoeffs(prefill, decode, decode, DEFAULT_BS_THRESHOLD)


def engine_latency_model(results, profile: LatencyModel, tp: int = 1) -> LatencyModel:
    """`profile` with its TP-`tp` coefficients refitted from the engine steps in `results`
    (RequestResults of replays), and no separate overhead: the steps already include it."""
    # Decode from the steps nothing beside them slowed (fit_step_costs charges those), where
    # there are enough of them.
    decodes = decode_steps(results, alone=True)
    if len(decodes) < MIN_STEPS:
        decodes = decode_steps(results)
    coeffs = fit_engine_coeffs(prefill_batches(results), decodes, profile.coeffs(tp))
    return LatencyModel(profile.model, {**profile.measured, tp: coeffs}, profile.kv_capacity,
                        profile.gpu_memory_bytes, StepOverhead(), profile.dtype_bytes)
