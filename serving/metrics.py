"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Latencies are the server's view: TTFT from the request's `issued` event to its first token,
TPOT = (last - first token time) / (tokens - 1), as DistServe defines them. Engine state
(queues, KV blocks, migrations) is read at scrape time. Only the event loop thread updates
these counters, so they need no lock.
"""
from __future__ import annotations

import bisect
from collections import Counter
from typing import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# engine.stats() key -> (metric name, help)
INSTANCE_GAUGES = {
    "waiting": ("dsjax_requests_waiting", "requests queued at the instance"),
    "running": ("dsjax_requests_running", "requests in the instance's running batch"),
    "swapped": ("dsjax_requests_swapped", "requests whose KV is swapped out to host memory"),
    "held": ("dsjax_requests_held",
             "prefilled requests holding KV until a decode instance pulls them"),
    "blocks_used": ("dsjax_kv_blocks_used", "KV cache blocks in use"),
    "blocks_total": ("dsjax_kv_blocks_total", "KV cache blocks in the instance's pool"),
}


class Histogram:
    def __init__(self, buckets: Iterable[float]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)   # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*map(_number, self.bounds), "+Inf"), self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]
        return out


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _escape(label_value: str) -> str:
    return str(label_value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class ServerMetrics:
    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.finished = Counter()      # finish reason -> requests
        self.http_errors = Counter()   # status code -> answers
        self.rejected_overload = 0

    def observe_finished(self, reason: str, output=None) -> None:
        self.finished[reason or "unknown"] += 1
        times = output.token_timestamps if output is not None else []
        if not times:
            return
        issued = next((e["timestamp"] for e in output.lifetime_events
                       if e["event_type"] == "issued"), None)
        if issued is not None:
            self.ttft.observe(max(0.0, times[0] - issued))
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def observe_http_error(self, status: int) -> None:
        self.http_errors[status] += 1

    def render(self, engine, active_requests: int) -> str:
        lines: list[str] = []
        lines += _family("dsjax_time_to_first_token_seconds", "histogram",
                         "time from arrival to the first generated token",
                         self.ttft.lines("dsjax_time_to_first_token_seconds"))
        lines += _family("dsjax_time_per_output_token_seconds", "histogram",
                         "mean time between a request's generated tokens after the first",
                         self.tpot.lines("dsjax_time_per_output_token_seconds"))
        lines += _family("dsjax_requests_finished_total", "counter",
                         "requests ended, by finish reason (stop, length, abort, error)",
                         [f'dsjax_requests_finished_total{{finish_reason="{_escape(r)}"}} {n}'
                          for r, n in sorted(self.finished.items())])
        lines += _family("dsjax_http_errors_total", "counter", "error answers, by HTTP status",
                         [f'dsjax_http_errors_total{{status="{s}"}} {n}'
                          for s, n in sorted(self.http_errors.items())])
        lines += _family("dsjax_requests_rejected_overload_total", "counter",
                         "requests answered 503 at the admission bound",
                         [f"dsjax_requests_rejected_overload_total {self.rejected_overload}"])
        lines += _family("dsjax_requests_in_flight", "gauge",
                         "requests admitted by the server and not finished",
                         [f"dsjax_requests_in_flight {active_requests}"])
        lines += self._engine_lines(engine)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _engine_lines(engine) -> list[str]:
        stats = engine.stats()
        lines: list[str] = []
        for key, (name, help_text) in INSTANCE_GAUGES.items():
            samples = [f'{name}{{instance="{_escape(s["instance"])}"}} {s[key]}'
                       for s in stats if key in s]
            lines += _family(name, "gauge", help_text, samples)
        migrations = dict(engine.migrations)
        for key, name in (("count", "dsjax_migrations_total"),
                          ("seconds", "dsjax_migration_seconds_total"),
                          ("bytes", "dsjax_migration_bytes_total")):
            lines += _family(name, "counter", f"KV cache migrations prefill -> decode: {key}",
                             [f"{name} {_number(migrations[key])}"])
        return lines
