"""What a new request would cost: its time to first token and time per output token, from both
phases' backlogs and rates measured from the engine's per-instance stats.

Prefill: the prompts queued at the least loaded prefill instance plus this one take
max(tokens / token budget, prompts / batch cap) steps of the measured prefill step time; when
decode back-pressure stalls prefill, the measured rate of prompts leaving a non-empty queue
bounds it instead. Decode: every sequence admitted and unfinished (the server's own count, so a
burst admitted between two engine reports is counted) will share the decode batches with this
one. A decode step's wall time grows with the batch (on a CPU, 6 ms at 16 rows, 100 ms at 128),
so it is measured per batch-size bucket (powers of two), interpolated between them and extended
along the two largest beyond them. Sequences past the decode instances' batch capacity wait for others to
finish (capacity / (step time x mean output length) per second); that wait, less the time
this request spends in prefill anyway, is spread over its output tokens.

A second token comes later than the steady pace (the KV pull, its wait for the decode loop):
that delay, measured in steady gaps from finished requests, is spread over the output too.

Rates are exponentially weighted by time (a half-life of HALF_LIFE_S), sampled from
engine.stats() at most every SAMPLE_S at admission time; until a rate is measured, the part of
the estimate that needs it is 0 (nothing is refused on a guess). What the model misses is
calibrated from the requests served in the last minute (see LoadEstimator.calibrate): under
overload the server sits where admission stops, so every admitted request sees about the
bound; it must stop where the 99th percentile, not the mean, meets it.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time

HALF_LIFE_S = 5.0
CALIBRATION_QUANTILE = 0.99   # of actual over estimated TPOT, and actual less estimated TTFT
SAMPLE_S = 0.02
MAX_SAMPLE_GAP_S = 1.0    # a longer gap between samples mixes idle time into a step's time
PREFILL_ROLES = ("prefill", "colocated", "chunked")
DECODE_ROLES = ("decode", "colocated", "chunked")
MIN_TPOT_RATIO = 0.5
# What the model missed for requests older than this no longer applies: a burst's long TTFTs
# would otherwise refuse requests to an idle server for its next 512 admissions.
CALIBRATION_MAX_AGE_S = 60.0


class Ratio:
    """sum(num) / sum(den), both decayed by the time since they were added."""

    def __init__(self, half_life: float = HALF_LIFE_S):
        self.half_life = half_life
        self.num = self.den = 0.0
        self.at: float | None = None

    def add(self, num: float, den: float, now: float) -> None:
        if self.at is not None:
            keep = 0.5 ** ((now - self.at) / self.half_life)
            self.num, self.den = self.num * keep, self.den * keep
        self.num, self.den, self.at = self.num + num, self.den + den, now

    def value(self) -> float | None:
        return self.num / self.den if self.den > 0 else None


def bucket(rows: float) -> int:
    """The power of two at or above `rows` (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(rows, 1.0))))


class RecentQuantile:
    """The q-quantile of the last `size` observations younger than `max_age` seconds,
    recomputed every `every` of them and when one ages out; `default` when there are none."""

    def __init__(self, q: float, default: float, size: int = 512, every: int = 16,
                 max_age: float = math.inf):
        self.q, self.default, self.every, self.max_age = q, default, every, max_age
        self.values: collections.deque = collections.deque(maxlen=size)   # (time, value)
        self._added, self._value = 0, default

    def add(self, value: float, now: float) -> None:
        self.values.append((now, value))
        self._added += 1
        if self._added % self.every == 0 or len(self.values) < self.every:
            self._recompute()

    def value(self, now: float) -> float:
        if self.values and now - self.values[0][0] > self.max_age:
            while self.values and now - self.values[0][0] > self.max_age:
                self.values.popleft()
            self._recompute()
        return self._value

    def _recompute(self) -> None:
        ordered = sorted(v for _, v in self.values)
        self._value = ordered[min(len(ordered) - 1, int(self.q * len(ordered)))] \
            if ordered else self.default


@dataclasses.dataclass(frozen=True)
class Estimate:
    ttft: float              # seconds to this request's first token (calibrated)
    tpot: float              # seconds per output token after the first (calibrated)
    ttft_alone: float        # the same on an idle engine: what no waiting can improve
    tpot_alone: float
    ttft_wait: float         # seconds until the first would meet the bound it was checked with
    tpot_wait: float
    model_ttft: float = 0.0  # the model's own figures, before calibration
    model_tpot: float = 0.0


class LoadEstimator:
    def __init__(self, engine, clock=time.monotonic):
        self.engine, self.clock = engine, clock
        cfg = engine.config
        self.prefill_batch_cap = cfg.context_max_batch_size
        self.decode_batch_cap = cfg.decoding_max_batch_size
        self.block_size = cfg.block_size
        self.prefill_step = Ratio()          # busy seconds per prefill step
        self.prefill_drain = Ratio()         # prompts per second leaving a non-empty queue
        self.decode_step: dict[int, Ratio] = {}   # rows bucket -> wall seconds per step
        self.output_len = Ratio()            # tokens per finished sequence
        # A sequence's second token comes later than the steady pace (the KV pull, its wait
        # for the decode loop): measured in steady gaps.
        self.entry_gap = Ratio()
        # What the model misses (interpreter and CPU contention, the load admitted after a
        # request, bursts of pulls): recent requests' actual TPOT over the model's estimate at
        # their admission, and actual TTFT less the estimate (its misses are added waits).
        self.tpot_ratio = RecentQuantile(CALIBRATION_QUANTILE, default=1.0,
                                         max_age=CALIBRATION_MAX_AGE_S)
        self.ttft_excess = RecentQuantile(CALIBRATION_QUANTILE, default=0.0,
                                          max_age=CALIBRATION_MAX_AGE_S)
        self._last: dict[str, dict] = {}
        self._last_at: float | None = None
        self._stats: list[dict] = []

    # ---- measuring ---------------------------------------------------------------------------

    def finished(self, timestamps: list[list[float]]) -> None:
        """A request finished; `timestamps`: its sequences' token times."""
        now = self.clock()
        for times in timestamps:
            self.output_len.add(len(times), 1, now)
            if len(times) >= 3:   # its first decode gap, against the steady ones after it
                self.entry_gap.add(times[1] - times[0], (times[-1] - times[1]) / (len(times) - 2),
                                   now)

    def calibrate(self, estimate: Estimate, ttft: float | None, tpot: float | None) -> None:
        """A request admitted with `estimate` was served in `ttft` and `tpot` seconds."""
        if ttft is not None:
            self.ttft_excess.add(max(0.0, ttft - estimate.model_ttft), self.clock())
        if tpot is not None and estimate.model_tpot > 0:
            self.tpot_ratio.add(max(MIN_TPOT_RATIO, tpot / estimate.model_tpot), self.clock())

    def sample(self) -> list[dict]:
        """The engine's live instances' stats, and the rates they imply since the last sample."""
        now = self.clock()
        if self._last_at is not None and now - self._last_at < SAMPLE_S:
            return self._stats
        stats = [s for s in self.engine.stats() if s.get("alive", True)]
        if self._last_at is not None and now - self._last_at <= MAX_SAMPLE_GAP_S:
            for s in stats:
                before = self._last.get(s["instance"])
                if before is not None:
                    self._measure(before, s, now - self._last_at, now)
        self._last = {s["instance"]: s for s in stats}
        self._last_at, self._stats = now, stats
        return stats

    def _measure(self, before: dict, after: dict, elapsed: float, now: float) -> None:
        steps = after.get("steps", 0) - before.get("steps", 0)
        role = after.get("role")
        if role == "prefill":
            if steps > 0:
                self.prefill_step.add(after["busy_s"] - before["busy_s"], steps, now)
            if before.get("waiting", 0) > 0 and after.get("waiting", 0) > 0:
                self.prefill_drain.add(after["tokens"] - before["tokens"], elapsed, now)
        elif role in PREFILL_ROLES and steps > 0:
            self.prefill_step.add(after["busy_s"] - before["busy_s"], steps, now)
        if role in DECODE_ROLES and before.get("running", 0) > 0 and after.get("running", 0) > 0:
            # Intervals without a step count too: a step longer than the sampling interval
            # would otherwise look as short as the interval that saw it end.
            self.decode_step.setdefault(bucket(after["running"]), Ratio()).add(elapsed, steps,
                                                                               now)

    def step_time(self, rows: float) -> float | None:
        """Wall seconds per decode step at `rows` rows: the bucket's measurement; between
        measured buckets, interpolated; below them, the smallest; above them, extended along
        the two largest (flat from one: a step measured while migrations crowd it would
        otherwise forbid the larger batches that would measure them). None: nothing measured."""
        want = bucket(rows)
        points = sorted((b, r.value()) for b, r in self.decode_step.items()
                        if r.value() is not None)
        if not points:
            return None
        if want <= points[0][0]:
            return points[0][1]
        for (b1, t1), (b2, t2) in zip(points, points[1:]):
            if want <= b2:
                return t1 + (want - b1) * (t2 - t1) / (b2 - b1)
        if len(points) == 1:
            return points[0][1]
        (b1, t1), (b2, t2) = points[-2:]
        return t2 + (want - b2) * max(0.0, (t2 - t1) / (b2 - b1))

    # ---- estimating --------------------------------------------------------------------------

    def estimate(self, in_flight_rows: int, prompt_lens: list[int], rows: int, max_tokens: int,
                 max_ttft: float = math.inf, max_tpot: float = math.inf) -> Estimate:
        """The cost of admitting prompts of `prompt_lens` tokens, `rows` sequences in all, each
        generating up to `max_tokens`, with `in_flight_rows` sequences already admitted; and
        how long until it would meet `max_ttft` and `max_tpot`."""
        stats = self.sample()
        prefills = [s for s in stats if s.get("role") in PREFILL_ROLES]
        decoders = [s for s in stats if s.get("role") in DECODE_ROLES]
        cap = self._decode_cap(decoders, max(prompt_lens, default=0), max_tokens)
        model_ttft, model_ttft_alone = self._ttft(prefills, prompt_lens)
        now = self.clock()
        excess, ratio = self.ttft_excess.value(now), self.tpot_ratio.value(now)
        ttft = model_ttft + excess
        load = (in_flight_rows + rows) / max(1, len(decoders))   # sequences per instance

        def tpot_at(load: float) -> float:
            return self._tpot(load, cap, model_ttft, max_tokens) * ratio

        tpot, tpot_wait = tpot_at(load), 0.0
        if tpot > max_tpot:   # the decode backlog must shrink to the load that meets the bound
            low, high = 0.0, load
            for _ in range(20):
                mid = (low + high) / 2
                low, high = (mid, high) if tpot_at(mid) <= max_tpot else (low, mid)
            tpot_wait = (load - low) / self._throughput(load, cap, max_tokens)
        alone = rows / max(1, len(decoders))
        return Estimate(ttft=ttft, tpot=tpot, ttft_alone=model_ttft_alone + excess,
                        tpot_alone=self._tpot(alone, cap, model_ttft_alone, max_tokens) * ratio,
                        ttft_wait=max(0.0, ttft - max_ttft), tpot_wait=tpot_wait,
                        model_ttft=model_ttft, model_tpot=tpot / ratio)

    def _throughput(self, load: float, cap: float, max_tokens: int) -> float:
        """Sequences a decode instance finishes per second with `load` sequences admitted
        (batches of at most `cap`), at the mean output length measured (else max_tokens)."""
        rows = min(max(load, 1.0), cap)
        step = self.step_time(rows)
        return rows / (step * (self.output_len.value() or max_tokens)) if step else math.inf

    def _tpot(self, load: float, cap: float, ttft: float, max_tokens: int) -> float:
        """Seconds per output token with `load` sequences per decode instance: the step time
        at the batch they make (at most `cap` rows), and the wait of those past the cap for a
        slot (less the time spent in prefill anyway), spread over the output."""
        step = self.step_time(min(load, cap)) or 0.0
        past_cap = max(0.0, load - cap)
        slot_wait = past_cap / self._throughput(load, cap, max_tokens) if past_cap else 0.0
        entry = max(0.0, (self.entry_gap.value() or 1.0) - 1.0) * step
        return step + (entry + max(0.0, slot_wait - ttft)) / max(1, max_tokens - 1)

    def _decode_cap(self, decoders: list[dict], prompt_len: float, max_tokens: int) -> float:
        """Rows a decode instance batches: its batch cap, or what its KV pages hold of
        sequences this long."""
        blocks = min((s.get("blocks_total") or 0 for s in decoders), default=0)
        per_sequence = math.ceil((prompt_len + max_tokens) / self.block_size)
        return max(1, min(self.decode_batch_cap, blocks // per_sequence or self.decode_batch_cap))

    def _ttft(self, prefills: list[dict], prompt_lens: list[int]) -> tuple[float, float]:
        """(seconds to the last of these prompts' first token, the same on an idle engine)."""
        step = self.prefill_step.value()
        if not prefills or step is None:
            return 0.0, 0.0
        n = len(prefills)
        budget = max(1, min(s.get("token_budget") or 1 for s in prefills))
        queued = sum(s.get("waiting", 0) for s in prefills) / n
        queued_tokens = sum(s.get("waiting_tokens", 0) for s in prefills) / n
        mine, my_tokens = len(prompt_lens), sum(prompt_lens)
        # Only chunked prefill splits a prompt over steps; elsewhere a prompt longer than the
        # budget runs whole, alone, in one step (whose measured time then covers it). Counting
        # its tokens in budgets made 16 queued 512-token prompts 64 steps against a 128-token
        # budget, 4x their real TTFT, and refused requests that would have met the bound.
        whole_prompts = all(s.get("role") != "chunked" for s in prefills)

        def steps(prompts: float, tokens: float) -> int:
            by_tokens = math.ceil(tokens / budget)
            if whole_prompts:
                by_tokens = min(by_tokens, math.ceil(prompts))
            return max(by_tokens, math.ceil(prompts / self.prefill_batch_cap))

        alone = steps(mine, my_tokens) * step
        compute = steps(queued + mine, queued_tokens + my_tokens) * step
        drain = self.prefill_drain.value()
        stalled = (queued + mine) / drain if drain and queued > 0 else 0.0
        return max(compute, stalled), alone
