"""Step-latency profiles in DistServe's JSON format, and the latency model built from them.

File format (DistServe's `profiler-*.json`): {model: {str(tp): {"prefill": [a, b, c],
"decoding_smallbs": [a, b, c], "decoding_largebs": [a, b, c],
"decoding_large_small_bs_threshold": n}}}, times in ms:
  prefill ms = a + b*sum(len) + c*sum(len^2);  decode ms = a + b*sum(ctx) + c*batch.
Our additions, ignored by DistServe's loader: per model "kv_capacity_tokens": {"<tp>x<pp>": tokens}
and "step_overhead_ms": {"base": ms, "per_token": ms} (host time per step, see StepOverhead),
and a top-level "hardware": {"gpu": name, "gpu_memory_bytes": bytes}.
KV capacity also comes from DistServe's max_num_tokens.csv beside the JSON when present.
DistServe's A100 files carry no overhead term: a model without "step_overhead_ms" gets none.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dsjax.config_files import PROFILE_DIR
from dsjax.models.registry import config_from_name

DEFAULT_PROFILE = PROFILE_DIR / "profiler-a100-80g.distserve.json"
A100_MEMORY_BYTES = 80e9
DEFAULT_BS_THRESHOLD = 95
# The artifact's simulator charges a hand-off between pipeline stages for prefill only.
PP_STAGE_OVERHEAD_MS = 1.0

Coeffs = tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class StepOverhead:
    """Host time a step costs on top of its kernels (scheduling, input packing, dispatch, output
    handling): base_ms + per_token_ms * tokens, where tokens is the step's context: the prompt
    tokens of a prefill batch, the context sum of a decode batch, both for a mixed iteration.
    DistServe's simulator charges 2 ms + 0.0001 ms/token per step for Ray; whether a real engine
    pays that is a measurement, so the term is fitted (fit_overhead) and stored per profile."""
    base_ms: float = 0.0
    per_token_ms: float = 0.0

    def ms(self, tokens: float) -> float:
        return self.base_ms + self.per_token_ms * tokens

    def to_json(self) -> dict:
        return {"base": self.base_ms, "per_token": self.per_token_ms}

    @classmethod
    def from_json(cls, d: Mapping) -> "StepOverhead":
        return cls(float(d["base"]), float(d["per_token"]))

    @classmethod
    def parse(cls, text: str) -> "StepOverhead":
        """"A,B" (ms, ms per token), as the command lines take it."""
        try:
            base, per_token = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"overhead {text!r}: write BASE_MS,PER_TOKEN_MS, e.g. 2,0.0001") from None
        if base < 0 or per_token < 0:
            raise ValueError(f"overhead {text!r}: both terms must be >= 0")
        return cls(base, per_token)


@dataclasses.dataclass(frozen=True)
class StepCoeffs:
    """One (model, TP) entry of a profile."""
    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    bs_threshold: int = DEFAULT_BS_THRESHOLD

    def to_json(self) -> dict:
        return {"decoding_large_small_bs_threshold": self.bs_threshold,
                "prefill": list(self.prefill), "decoding_smallbs": list(self.decode_small),
                "decoding_largebs": list(self.decode_large)}

    @classmethod
    def from_json(cls, d: Mapping) -> "StepCoeffs":
        return cls(tuple(d["prefill"]), tuple(d["decoding_smallbs"]), tuple(d["decoding_largebs"]),
                   int(d.get("decoding_large_small_bs_threshold", DEFAULT_BS_THRESHOLD)))


def canonical_model_name(model: str) -> str:
    """"opt-13b" and "facebook/opt-13b" both name DistServe's key "facebook/opt-13b"."""
    return model if "/" in model else f"facebook/{model.lower()}"


class LatencyModel:
    """Step latencies of one model on one kind of GPU, for any (TP, PP).

    TP degrees without coefficients are interpolated per coefficient across the measured
    degrees: a power law x(tp) = A * tp^k fitted on logs (k = -1 is work split tp ways; the fit
    keeps every coefficient positive, which a linear fit in 1/tp does not for OPT-13B's c at
    TP 8); a coefficient measured <= 0 somewhere gets x = alpha + beta / tp, clamped at 0.
    With a single measured degree the compute terms (b, c) scale by tp0 / tp.
    """

    def __init__(self, model: str, coeffs: Mapping[int, StepCoeffs],
                 kv_capacity: Mapping[tuple[int, int], int] | None = None,
                 gpu_memory_bytes: float = A100_MEMORY_BYTES,
                 overhead: StepOverhead = StepOverhead(), dtype_bytes: int = 2):
        if not coeffs:
            raise ValueError(f"no step coefficients for {model}; profile it first "
                             f"(the profile's model keys must match)")
        self.model = canonical_model_name(model)
        self.measured = dict(sorted(coeffs.items()))
        self.kv_capacity = dict(kv_capacity or {})
        self.gpu_memory_bytes = gpu_memory_bytes
        self.overhead = overhead
        # Bytes per weight and KV element: 2 (FP16, the paper's); a profile says its own.
        self.dtype_bytes = dtype_bytes
        self.config = config_from_name(self.model)
        self._cache: dict[int, StepCoeffs] = {}

    def with_overhead(self, overhead: StepOverhead) -> "LatencyModel":
        return LatencyModel(self.model, self.measured, self.kv_capacity, self.gpu_memory_bytes,
                            overhead, self.dtype_bytes)

    def coeffs(self, tp: int) -> StepCoeffs:
        if tp in self.measured:
            return self.measured[tp]
        if tp not in self._cache:
            self._cache[tp] = self._interpolate(tp)
        return self._cache[tp]

    def _interpolate(self, tp: int) -> StepCoeffs:
        tps = list(self.measured)
        rows = [(*c.prefill, *c.decode_small, *c.decode_large) for c in self.measured.values()]
        values = np.array(rows, dtype=float)
        if len(tps) == 1:
            ratio = tps[0] / tp
            scale = np.array([1, ratio, ratio] * 3)
            new = values[0] * scale
        else:
            new = np.array([_fit_over_tp(tps, values[:, j], tp) for j in range(values.shape[1])])
        threshold = next(iter(self.measured.values())).bs_threshold
        n = [float(x) for x in new]
        return StepCoeffs(tuple(n[0:3]), tuple(n[3:6]), tuple(n[6:9]), threshold)

    # ------------------------------------------------------------ step times (ms)

    def prefill_stage_ms(self, sum_len: float, sum_sq: float, tp: int, pp: int = 1) -> float:
        """Time one pipeline stage is busy with a prefill batch; the batch leaves after pp stages."""
        a, b, c = self.coeffs(tp).prefill
        total = a + b * sum_len + c * sum_sq
        return total / pp + (PP_STAGE_OVERHEAD_MS if pp > 1 else 0.0)

    def decode_stage_ms(self, batch: int, sum_ctx: float, tp: int, pp: int = 1) -> float:
        """Time one stage is busy with a decode micro-batch (the artifact adds no PP overhead)."""
        if batch == 0:
            return 0.0
        co = self.coeffs(tp)
        a, b, c = co.decode_small if batch < co.bs_threshold else co.decode_large
        return (a + b * sum_ctx + c * batch) / pp

    def overhead_ms(self, tokens: float) -> float:
        """Host time of one step over `tokens` context tokens (StepOverhead), charged once per
        step however many pipeline stages it crosses."""
        return self.overhead.ms(tokens)

    def prefill_ms(self, lengths: Sequence[int], tp: int, pp: int = 1) -> float:
        """Stage time of a prefill batch of these prompt lengths (see prefill_stage_ms)."""
        return self.prefill_stage_ms(sum(lengths), sum(x * x for x in lengths), tp, pp)

    def decode_ms(self, context_lens: Sequence[int], tp: int, pp: int = 1) -> float:
        """Stage time of one decode step over requests with these context lengths."""
        return self.decode_stage_ms(len(context_lens), sum(context_lens), tp, pp)

    # ------------------------------------------------------------ memory

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        """KV tokens an instance holds: the profile's figure, else GPU memory left after the
        weights (tp * pp GPUs of gpu_memory_bytes) over the KV bytes per token; 0 if the
        weights do not fit."""
        if (tp, pp) in self.kv_capacity:
            return self.kv_capacity[(tp, pp)]
        free = tp * pp * self.gpu_memory_bytes - self.dtype_bytes * self.config.num_params()
        return max(0, int(free // self.kv_bytes_per_token()))

    def kv_bytes_per_token(self) -> int:
        """K and V bytes of one token, in the profiled dtype: what a KV pull moves."""
        return self.config.kv_bytes_per_token(self.dtype_bytes)


def _fit_over_tp(tps: Sequence[int], ys: np.ndarray, tp: int) -> float:
    x = np.array(tps, dtype=float)
    if np.all(ys > 0):
        k, log_a = np.polyfit(np.log(x), np.log(ys), 1)
        return float(np.exp(log_a) * tp**k)
    beta, alpha = np.polyfit(1.0 / x, ys, 1)
    return max(float(alpha + beta / tp), 0.0)


# ---------------------------------------------------------------- files

def _is_model_entry(value) -> bool:
    return isinstance(value, dict) and any(k.isdigit() for k in value)


# Element bytes of the dtypes a profile may name (a profile without one is FP16, as DistServe's).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def load_profile(path: str | os.PathLike | None, model: str,
                 kv_csv: str | os.PathLike | None = None) -> LatencyModel:
    """The latency model of `model` from a DistServe-format JSON profile (default: the A100 one).
    KV capacities come from the file's "kv_capacity_tokens" and from `kv_csv` (default: a
    max_num_tokens.csv next to the JSON)."""
    path = Path(path) if path is not None else DEFAULT_PROFILE
    data = json.loads(path.read_text())
    key = canonical_model_name(model)
    entry = data.get(key) or data.get(model)
    if not _is_model_entry(entry):
        known = [k for k, v in data.items() if _is_model_entry(v)]
        raise ValueError(f"profile {path} has no coefficients for {key}; it covers {known}. "
                         f"Profile the model or pass another --profile")
    coeffs = {int(tp): StepCoeffs.from_json(v) for tp, v in entry.items() if tp.isdigit()}
    kv = _read_kv_csv(Path(kv_csv) if kv_csv else path.parent / "max_num_tokens.csv", key)
    for tp_pp, tokens in entry.get("kv_capacity_tokens", {}).items():
        tp, pp = (int(x) for x in tp_pp.split("x"))
        kv[(tp, pp)] = int(tokens)
    memory = float(data.get("hardware", {}).get("gpu_memory_bytes", A100_MEMORY_BYTES))
    overhead = StepOverhead.from_json(entry["step_overhead_ms"]) if "step_overhead_ms" in entry \
        else StepOverhead()
    dtype = data.get("hardware", {}).get("dtype", "float16")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"profile {path} names dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}. "
                         f"Add its element size to DTYPE_BYTES or profile in a known dtype")
    return LatencyModel(key, coeffs, kv, memory, overhead, DTYPE_BYTES[dtype])


def _read_kv_csv(path: Path, model: str) -> dict[tuple[int, int], int]:
    if not path.exists():
        return {}
    with open(path) as f:
        return {(int(r["tp"]), int(r["pp"])): int(r["max_num_tokens"])
                for r in csv.DictReader(f) if canonical_model_name(r["model"]) == model}


def save_profile(path: str | os.PathLike, model: str, coeffs: Mapping[int, StepCoeffs],
                 kv_capacity: Mapping[tuple[int, int], int] | None = None,
                 hardware: Mapping | None = None, overhead: StepOverhead | None = None) -> None:
    """Write (or merge into an existing file) one model's entry in DistServe's format."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {str(tp): c.to_json() for tp, c in sorted(coeffs.items())}
    if kv_capacity:
        entry["kv_capacity_tokens"] = {f"{tp}x{pp}": int(n) for (tp, pp), n in sorted(kv_capacity.items())}
    if overhead is not None:
        entry["step_overhead_ms"] = overhead.to_json()
    data[canonical_model_name(model)] = entry
    if hardware:
        data["hardware"] = dict(hardware)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------- least-squares fits

def _lstsq(rows: Sequence[Sequence[float]], ms: Sequence[float], what: str) -> Coeffs:
    if len(rows) < 3:
        raise ValueError(f"fitting {what} needs at least 3 timed batches, got {len(rows)}")
    sol, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(ms, dtype=float), rcond=None)
    return (float(sol[0]), float(sol[1]), float(sol[2]))


def fit_prefill(batches: Sequence[Sequence[int]], ms: Sequence[float]) -> Coeffs:
    """(a, b, c) of prefill ms = a + b*sum(len) + c*sum(len^2) from timed batches of prompt lengths."""
    rows = [(1.0, sum(b), sum(x * x for x in b)) for b in batches]
    return _lstsq(rows, ms, "prefill")


def fit_decode(batches: Sequence[Sequence[int]], ms: Sequence[float],
               threshold: int = DEFAULT_BS_THRESHOLD) -> tuple[Coeffs, Coeffs]:
    """(small-batch, large-batch) (a, b, c) of decode ms = a + b*sum(ctx) + c*batch, split at
    `threshold`; a side with under 3 samples reuses the other side's fit."""
    sides = {True: ([], []), False: ([], [])}
    for b, t in zip(batches, ms):
        rows, ys = sides[len(b) < threshold]
        rows.append((1.0, sum(b), len(b)))
        ys.append(t)
    fits = {small: _lstsq(*sides[small], f"decode ({'small' if small else 'large'} batches)")
            for small in (True, False) if len(sides[small][0]) >= 3}
    if not fits:
        raise ValueError(f"fitting decode needs at least 3 timed batches, got {len(batches)}")
    small = fits.get(True, fits.get(False))
    large = fits.get(False, small)
    return small, large


def fit_overhead(tokens: Sequence[float], ms: Sequence[float]) -> StepOverhead:
    """StepOverhead from measured steps: `tokens` each step's context tokens (as StepOverhead
    counts them), `ms` the host time it took beyond its kernels (e.g. the engine's whole step
    minus the timed model step). Least squares of ms = base + per_token * tokens with both terms
    kept >= 0: a negative slope is noise around a constant, a negative base means no base."""
    if len(tokens) != len(ms):
        raise ValueError(f"fit_overhead: {len(tokens)} token counts but {len(ms)} times")
    if len(ms) < 2:
        raise ValueError(f"fitting the step overhead needs at least 2 timed steps, got {len(ms)}")
    x, y = np.asarray(tokens, float), np.asarray(ms, float)
    if np.ptp(x) > 0:
        per_token, base = np.polyfit(x, y, 1)
        if per_token >= 0 and base >= 0:
            return StepOverhead(float(base), float(per_token))
    # The unconstrained optimum has a negative term: the best fit keeps one term at 0.
    flat = StepOverhead(max(float(y.mean()), 0.0), 0.0)
    through_zero = StepOverhead(0.0, max(float(x @ y / (x @ x)), 0.0) if x @ x > 0 else 0.0)
    sse = lambda o: float(((y - o.base_ms - o.per_token_ms * x) ** 2).sum())
    return min((flat, through_zero), key=sse)


# Representative steps for fitting size exponents: single prompts, and decode batches at a
# ShareGPT-like mean context.
_SIZE_FIT_PROMPTS = (128, 512, 1024, 2048)
_SIZE_FIT_DECODE_BATCHES = (8, 32, 128)
_SIZE_FIT_CONTEXT = 1000


def scale_model(source: LatencyModel, reference: LatencyModel, target: str,
                kv_csv: str | os.PathLike | None = None) -> LatencyModel:
    """A profile for an OPT size nobody profiled (DistServe's files stop at OPT-66B), from two
    measured sizes: per phase, step time ~ (parameters)^k, with k fitted on the TP degrees both
    `source` and `reference` measured (geometric mean over representative steps); `source`'s
    coefficients are then multiplied by (target params / source params)^k. Scaling by FLOPs
    alone (k = 1) overstates OPT-66B from OPT-13B by 1.3-1.7x: bigger matrices use the GPU
    better. KV capacities come from max_num_tokens.csv (it covers OPT-175B), else from memory."""
    shared = sorted(set(source.measured) & set(reference.measured))
    if not shared:
        raise ValueError(f"{source.model} and {reference.model} share no measured TP degree")
    size_ratio = source.config.num_params() / reference.config.num_params()
    dst = config_from_name(canonical_model_name(target))
    grow = dst.num_params() / source.config.num_params()

    def factor(step) -> float:
        logs = [math.log(step(source, tp) / step(reference, tp)) for tp in shared]
        return grow ** (sum(logs) / len(logs) / math.log(size_ratio))

    prefill = factor(lambda m, tp: math.prod(m.prefill_ms([n], tp) for n in _SIZE_FIT_PROMPTS))
    decode = factor(lambda m, tp: math.prod(m.decode_ms([_SIZE_FIT_CONTEXT] * b, tp)
                                            for b in _SIZE_FIT_DECODE_BATCHES))
    prefill, decode = prefill ** (1 / len(_SIZE_FIT_PROMPTS)), decode ** (1 / len(_SIZE_FIT_DECODE_BATCHES))
    times = lambda c, f: tuple(x * f for x in c)
    coeffs = {tp: StepCoeffs(times(c.prefill, prefill), times(c.decode_small, decode),
                             times(c.decode_large, decode), c.bs_threshold)
              for tp, c in source.measured.items()}
    key = canonical_model_name(target)
    kv = _read_kv_csv(Path(kv_csv) if kv_csv else DEFAULT_PROFILE.parent / "max_num_tokens.csv", key)
    return LatencyModel(key, coeffs, kv, source.gpu_memory_bytes, source.overhead,
                        source.dtype_bytes)


def scale_by_flops(source: LatencyModel, target: str) -> LatencyModel:
    """A profile for a model nobody profiled, of any family, from a profiled one: each term
    scaled by what it pays for. Prefill: the per-token term by matmul FLOPs per token, the
    quadratic term by attention FLOPs (heads x head_dim x layers), the fixed term unchanged.
    Decode: the fixed term (weights read once per step) by parameters, the per-context-token
    term (the KV read) by KV bytes per token (a GQA model's is 4-8x smaller), the per-row
    term by matmul FLOPs per token. An estimate: say so wherever it is used."""
    dst = config_from_name(canonical_model_name(target))
    src = source.config
    flops = dst.matmul_flops_per_token() / src.matmul_flops_per_token()
    attention = dst.attention_flops_per_token(1) / src.attention_flops_per_token(1)
    params = dst.num_params() / src.num_params()
    kv = dst.kv_bytes_per_token(2) / src.kv_bytes_per_token(2)
    prefill = (1.0, flops, attention)
    decode = (params, kv, flops)
    times = lambda c, f: tuple(x * y for x, y in zip(c, f))  # noqa: E731
    coeffs = {tp: StepCoeffs(times(c.prefill, prefill), times(c.decode_small, decode),
                             times(c.decode_large, decode), c.bs_threshold)
              for tp, c in source.measured.items()}
    return LatencyModel(canonical_model_name(target), coeffs, {}, source.gpu_memory_bytes,
                        source.overhead, source.dtype_bytes)


def load_profile_or_scaled(path: str | os.PathLike | None, model: str,
                           reference: str = "opt-13b") -> tuple[LatencyModel, str | None]:
    """(the model's profile, None), or where the profile has no entry for it, (a profile
    scaled by FLOPs from `reference`'s entry, a note saying so)."""
    try:
        return load_profile(path, model), None
    except ValueError as missing:
        try:
            config_from_name(canonical_model_name(model))
        except ValueError:
            raise missing from None
    scaled = scale_by_flops(load_profile(path, reference), model)
    return scaled, (f"no profile of {model}: its step times are {reference}'s scaled by FLOPs, "
                    f"parameters and KV bytes (latency_model.scale_by_flops), an estimate")
