"""Per-request results, DistServe's `.exp` files, and the metrics computed from them."""
from __future__ import annotations

import ast
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

EXP_FIELDS = ("prompt_len", "output_len", "start_time", "end_time", "token_timestamps",
              "lifecycle_events", "latency", "ftl", "tpot")


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int
    start_time: float
    end_time: float
    token_timestamps: list[float]
    lifecycle_events: list[dict] | None
    latency: float
    ftl: float    # time to first token (TTFT), seconds
    tpot: float   # time per output token after the first, seconds

    @classmethod
    def from_timestamps(cls, prompt_len: int, output_len: int, start_time: float,
                        token_timestamps: Sequence[float], lifecycle_events: list[dict] | None = None,
                        end_time: float | None = None) -> "RequestResult":
        """end_time defaults to the last token's time."""
        if not token_timestamps:
            raise ValueError("a RequestResult needs at least one token timestamp; "
                             "record requests that produced none as failures")
        stamps = [float(t) for t in token_timestamps]
        end = stamps[-1] if end_time is None else float(end_time)
        tpot = 0.0 if output_len <= 1 else (stamps[-1] - stamps[0]) / (output_len - 1)
        return cls(prompt_len, output_len, float(start_time), end, stamps, lifecycle_events,
                   latency=end - float(start_time), ftl=stamps[0] - float(start_time), tpot=tpot)


@dataclass
class FailedRequest:
    """A request that got an HTTP error or lost its connection; kept beside the .exp file."""
    prompt_len: int
    output_len: int
    start_time: float
    error: str


# ---------------------------------------------------------------- files

def save_exp(results: Sequence[RequestResult], path: str | os.PathLike) -> None:
    """A JSON list with one object per request, keys in DistServe's order."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump([asdict(r) for r in results], f)


def load_exp(path: str | os.PathLike) -> list[RequestResult]:
    """Read an `.exp` file: DistServe's JSON list, or the Python-literal list of its older
    client (keys issue_time/first_token_time/complete_time, times in ms)."""
    text = Path(path).read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = ast.literal_eval(text.splitlines()[0])   # old files append a summary after line 1
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of request results")
    return [_from_record(r, path) for r in records]


def _from_record(rec: dict[str, Any], path: Any) -> RequestResult:
    if "issue_time" in rec:   # older DistServe client: only first and last token times
        return RequestResult.from_timestamps(
            rec["prompt_len"], rec["output_len"], rec["issue_time"],
            [rec["first_token_time"], rec["complete_time"]], None, end_time=rec["complete_time"])
    missing = [k for k in EXP_FIELDS if k not in rec and k != "lifecycle_events"]
    if missing:
        raise ValueError(f"{path}: a record lacks {missing}; is this a DistServe .exp file?")
    return RequestResult(**{k: rec.get(k) for k in EXP_FIELDS})


def failures_path(exp_path: str | os.PathLike) -> Path:
    return Path(str(exp_path) + ".failed.json")


def save_failures(failures: Sequence[FailedRequest], exp_path: str | os.PathLike) -> None:
    """Written only when there are failures, so .exp directories stay artifact-compatible."""
    path = failures_path(exp_path)
    if failures:
        path.write_text(json.dumps([asdict(f) for f in failures]))
    elif path.exists():
        path.unlink()


def load_failures(exp_path: str | os.PathLike) -> list[FailedRequest]:
    path = failures_path(exp_path)
    return [FailedRequest(**r) for r in json.loads(path.read_text())] if path.exists() else []


# ---------------------------------------------------------------- metrics

def attainment(results: Sequence[RequestResult], ttft_slo: float, tpot_slo: float,
               num_failed: int = 0) -> tuple[float, float, float]:
    """(both, TTFT only, TPOT only) shares of requests meeting the SLOs; failures count as misses."""
    total = len(results) + num_failed
    if total == 0:
        return (0.0, 0.0, 0.0)
    ttft_ok = [r.ftl <= ttft_slo for r in results]
    tpot_ok = [r.tpot <= tpot_slo for r in results]
    both = sum(a and b for a, b in zip(ttft_ok, tpot_ok))
    return (both / total, sum(ttft_ok) / total, sum(tpot_ok) / total)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats(values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {"mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def summarize(results: Sequence[RequestResult], ttft_slo: float | None = None,
              tpot_slo: float | None = None, num_failed: int = 0) -> dict[str, Any]:
    """{"num_requests", "num_failed", "ttft": {mean,p50,p90,p99}, "tpot": {...}, "latency": {...},
    and, when both SLOs are given, "attainment": {"both", "ttft", "tpot"}} (seconds, fractions)."""
    summary: dict[str, Any] = {
        "num_requests": len(results) + num_failed,
        "num_failed": num_failed,
        "ttft": _stats([r.ftl for r in results]),
        "tpot": _stats([r.tpot for r in results]),
        "latency": _stats([r.latency for r in results]),
    }
    if ttft_slo is not None and tpot_slo is not None:
        both, ttft, tpot = attainment(results, ttft_slo, tpot_slo, num_failed)
        summary["attainment"] = {"both": both, "ttft": ttft, "tpot": tpot}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A small fixed-width table of a summarize() result, times in ms."""
    lines = [f"{'metric':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key, label in (("ttft", "TTFT ms"), ("tpot", "TPOT ms"), ("latency", "lat. ms")):
        s = summary[key]
        lines.append(f"{label:<10}" + "".join(f"{s[p] * 1000:>10.1f}" for p in ("mean", "p50", "p90", "p99")))
    if "attainment" in summary:
        a = summary["attainment"]
        lines.append(f"SLO attainment: both {a['both']:.1%}  TTFT {a['ttft']:.1%}  TPOT {a['tpot']:.1%}")
    lines.append(f"requests: {summary['num_requests']}  failed: {summary['num_failed']}")
    return "\n".join(lines)
