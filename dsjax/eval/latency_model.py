"""Step-latency profiles in DistServe's JSON format, and the latency model built from them.

File format (DistServe's `profiler-*.json`): {model: {str(tp): {"prefill": [a, b, c],
"decoding_smallbs": [a, b, c], "decoding_largebs": [a, b, c],
"decoding_large_small_bs_threshold": n}}}, times in ms:
  prefill ms = a + b*sum(len) + c*sum(len^2);  decode ms = a + b*sum(ctx) + c*batch.
Our additions, ignored by DistServe's loader: per model "kv_capacity_tokens": {"<tp>x<pp>": tokens},
and a top-level "hardware": {"gpu": name, "gpu_memory_bytes": bytes}.
KV capacity also comes from DistServe's max_num_tokens.csv beside the JSON when present.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from models.config import OPTConfig

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "profiles"
DEFAULT_PROFILE = PROFILE_DIR / "profiler-a100-80g.distserve.json"
A100_MEMORY_BYTES = 80e9
DEFAULT_BS_THRESHOLD = 95
# The artifact's simulator charges a hand-off between pipeline stages for prefill only.
PP_STAGE_OVERHEAD_MS = 1.0

Coeffs = tuple[float, float, float]


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
                 gpu_memory_bytes: float = A100_MEMORY_BYTES):
        if not coeffs:
            raise ValueError(f"no step coefficients for {model}; profile it first "
                             f"(the profile's model keys must match)")
        self.model = canonical_model_name(model)
        self.measured = dict(sorted(coeffs.items()))
        self.kv_capacity = dict(kv_capacity or {})
        self.gpu_memory_bytes = gpu_memory_bytes
        self.config = OPTConfig.from_name(self.model)
        self._cache: dict[int, StepCoeffs] = {}

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

    def prefill_ms(self, lengths: Sequence[int], tp: int, pp: int = 1) -> float:
        """Stage time of a prefill batch of these prompt lengths (see prefill_stage_ms)."""
        return self.prefill_stage_ms(sum(lengths), sum(x * x for x in lengths), tp, pp)

    def decode_ms(self, context_lens: Sequence[int], tp: int, pp: int = 1) -> float:
        """Stage time of one decode step over requests with these context lengths."""
        return self.decode_stage_ms(len(context_lens), sum(context_lens), tp, pp)

    # ------------------------------------------------------------ memory

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        """KV tokens an instance holds: the profile's figure, else GPU memory left after the
        FP16 weights (tp * pp GPUs of gpu_memory_bytes) over the KV bytes per token; 0 if the
        weights do not fit."""
        if (tp, pp) in self.kv_capacity:
            return self.kv_capacity[(tp, pp)]
        free = tp * pp * self.gpu_memory_bytes - 2 * self.config.num_params()
        return max(0, int(free // self.config.kv_bytes_per_token(2)))

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(2)


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
    return LatencyModel(key, coeffs, kv, memory)


def _read_kv_csv(path: Path, model: str) -> dict[tuple[int, int], int]:
    if not path.exists():
        return {}
    with open(path) as f:
        return {(int(r["tp"]), int(r["pp"])): int(r["max_num_tokens"])
                for r in csv.DictReader(f) if canonical_model_name(r["model"]) == model}


def save_profile(path: str | os.PathLike, model: str, coeffs: Mapping[int, StepCoeffs],
                 kv_capacity: Mapping[tuple[int, int], int] | None = None,
                 hardware: Mapping | None = None) -> None:
    """Write (or merge into an existing file) one model's entry in DistServe's format."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {str(tp): c.to_json() for tp, c in sorted(coeffs.items())}
    if kv_capacity:
        entry["kv_capacity_tokens"] = {f"{tp}x{pp}": int(n) for (tp, pp), n in sorted(kv_capacity.items())}
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
