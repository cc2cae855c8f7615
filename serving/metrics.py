"""GET /metrics: vLLM's metric names (dashboards built for vLLM work) plus dsjax's own.

prometheus_client renders the exposition, from a registry per app (two apps in one process,
as the tests run them, do not share counts). Per-request histograms are observed when a request
finishes, from its lifetime events and token timestamps (the engine's time.perf_counter clock);
engine state (queues, KV blocks, preemptions, migrations) is read at scrape time by a collector.
Every series carries `model_name`; per-instance dsjax_* series carry `instance`. Only the event
loop thread observes, so nothing here needs a lock.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.admission import REJECTION_REASONS
from serving.connection_gate import CONNECTION_REASONS

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# Per-request phases: histogram name -> (help, buckets).
PHASES = {
    "vllm:time_to_first_token_seconds": ("time from arrival to the first token", TTFT_BUCKETS),
    "vllm:inter_token_latency_seconds": ("time between a request's consecutive tokens",
                                         ITL_BUCKETS),
    "vllm:e2e_request_latency_seconds": ("time from arrival to the last token",
                                         REQUEST_BUCKETS),
    "vllm:request_queue_time_seconds": ("time from arrival to the start of its prefill",
                                        REQUEST_BUCKETS),
    "vllm:request_prefill_time_seconds": ("time the prefill step took", REQUEST_BUCKETS),
    "vllm:request_decode_time_seconds": ("time from the first token to the last",
                                         REQUEST_BUCKETS),
}

# engine.stats() key -> (dsjax metric, help): per instance.
INSTANCE_GAUGES = {
    "waiting": ("dsjax_requests_waiting", "requests queued at the instance"),
    "running": ("dsjax_requests_running", "requests in the instance's running batch"),
    "swapped": ("dsjax_requests_swapped", "requests whose KV is swapped out to host memory"),
    "held": ("dsjax_requests_held",
             "prefilled requests holding KV until a decode instance pulls them"),
    "blocks_used": ("dsjax_kv_blocks_used", "KV cache blocks in use"),
    "blocks_total": ("dsjax_kv_blocks_total", "KV cache blocks in the instance's pool"),
    "blocks_cached": ("dsjax_kv_blocks_cached",
                      "KV cache blocks whose prefix is known (in use or reusable)"),
}
# Requests admitted into the engine but in no running batch: what vLLM calls waiting.
WAITING_KEYS = ("waiting", "held", "swapped")


def request_phases(output) -> dict[str, list[float]]:
    """Histogram name -> observations, from a finished output's events and token times."""
    times = output.token_timestamps
    events = {}
    for event in output.lifetime_events:
        events.setdefault(event["event_type"], event["timestamp"])
    phases: dict[str, list[float]] = {}

    def span(name: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None:
            phases[name] = [max(0.0, end - start)]

    issued = events.get("issued")
    span("vllm:request_queue_time_seconds", issued, events.get("context_begin"))
    span("vllm:request_prefill_time_seconds", events.get("context_begin"),
         events.get("context_end"))
    if times:
        span("vllm:time_to_first_token_seconds", issued, times[0])
        span("vllm:e2e_request_latency_seconds", issued, times[-1])
        span("vllm:request_decode_time_seconds", times[0], times[-1])
        phases["vllm:inter_token_latency_seconds"] = [b - a for a, b in zip(times, times[1:])]
    return phases


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def counter(name, help_text, extra=()):
            return Counter(name, help_text, [*labels, *extra], registry=self.registry)

        self.histograms = {name: Histogram(name, help_text, labels, buckets=buckets,
                                           registry=self.registry).labels(model_name)
                           for name, (help_text, buckets) in PHASES.items()}
        self.prompt_tokens = counter("vllm:prompt_tokens", "prompt tokens of finished "
                                     "requests").labels(model_name)
        self.generation_tokens = counter("vllm:generation_tokens", "tokens generated by "
                                         "finished requests").labels(model_name)
        self.success = counter("vllm:request_success", "requests finished, by finish reason "
                               "(stop, length, abort, error)", ["finished_reason"])
        self.http_errors = counter("dsjax_http_errors", "error answers, by HTTP status",
                                   ["status"])
        self.rejections = counter("dsjax_admission_rejections", "requests and connections "
                                  "refused with 503, by reason", ["reason"])
        for reason in (*REJECTION_REASONS, *CONNECTION_REASONS):   # each shows, 0 at first
            self.rejections.labels(model_name, reason)
        self.unused_closed = counter("dsjax_unused_connections_closed", "connections that sent "
                                     "no request, closed to make room for a new one past a "
                                     "bound").labels(model_name)

    def observe_finished(self, reason: str | None, output=None) -> None:
        self.success.labels(self.model_name, reason or "unknown").inc()
        if output is None:
            return
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(len(output.token_ids))
        for name, values in request_phases(output).items():
            for value in values:
                self.histograms[name].observe(value)

    def observe_http_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def observe_rejection(self, reason: str) -> None:
        self.rejections.labels(self.model_name, reason).inc()

    def observe_connection_refusal(self, reason: str) -> None:
        """A connection refused past a bound: a 503 answer the app never saw."""
        self.observe_rejection(reason)
        self.observe_http_error(503)

    def observe_unused_connection_closed(self) -> None:
        self.unused_closed.inc()

    def watch_connections(self, num_open) -> None:
        Gauge("dsjax_connections_open", "HTTP connections open", ["model_name"],
              registry=self.registry).labels(self.model_name).set_function(num_open)

    def watch(self, engine, num_active) -> None:
        """Read the engine's state (and the admission queue's length, num_active()) per scrape."""
        self.registry.register(EngineCollector(engine, self.model_name, num_active))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """Engine state at scrape time, as vLLM's gauges and dsjax's per-instance ones."""

    def __init__(self, engine, model_name: str, num_active):
        self.engine = engine
        self.model_name = model_name
        self.num_active = num_active

    def describe(self):
        return []   # not known before the first scrape; prometheus_client then skips the check

    def collect(self):
        # A failed instance's last report would stay frozen: it holds nothing any more.
        stats = [s if s.get("alive", True) else {**s, **{k: 0 for k in INSTANCE_GAUGES}}
                 for s in self.engine.stats()]
        name = [self.model_name]

        def family(kind, metric, help_text, value, **labels):
            f = kind(metric, help_text, labels=["model_name", *labels])
            f.add_metric(name + list(labels.values()), value)
            return f

        used = sum(s["blocks_used"] for s in stats)
        total = sum(s["blocks_total"] for s in stats)
        yield family(GaugeMetricFamily, "vllm:num_requests_running",
                     "requests in running batches (all instances)",
                     sum(s["running"] for s in stats))
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting",
                     "requests queued, held for migration or swapped out (all instances)",
                     sum(s.get(k, 0) for s in stats for k in WAITING_KEYS))
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc",
                     "KV cache blocks in use over all instances; 1 means full",
                     used / total if total else 0.0)
        yield family(CounterMetricFamily, "vllm:num_preemptions",
                     "requests swapped out to host memory to make room",
                     sum(s.get("num_preemptions", 0) for s in stats))
        # vLLM's prefix-cache counters: prompt tokens looked up, and found cached.
        for key in ("prefix_cache_queries", "prefix_cache_hits"):
            yield family(CounterMetricFamily, f"vllm:{key}",
                         f"prefix cache {key.split('_')[-1]}, in tokens (all instances)",
                         sum(s.get(key, 0) for s in stats))
        yield family(GaugeMetricFamily, "dsjax_admission_queue_length",
                     "requests admitted by the server and not finished (bounded by --max-queue)",
                     self.num_active())
        up = GaugeMetricFamily("dsjax_instance_up", "1 while the instance serves, 0 once it "
                               "failed", labels=["model_name", "instance"])
        for s in stats:
            up.add_metric([self.model_name, s["instance"]], 1 if s.get("alive", True) else 0)
        yield up
        for key, (metric, help_text) in INSTANCE_GAUGES.items():
            f = GaugeMetricFamily(metric, help_text, labels=["model_name", "instance"])
            for s in stats:
                if key in s:
                    f.add_metric([self.model_name, s["instance"]], s[key])
            yield f
        for key, metric, what in (("migrations", "dsjax_migrations", "count"),
                                  ("migration_seconds", "dsjax_migration_seconds", "seconds"),
                                  ("migration_bytes", "dsjax_migration_bytes", "bytes"),
                                  ("migration_bytes_saved", "dsjax_migration_bytes_saved",
                                   "bytes the decode instance's prefix cache held (not moved)")):
            f = CounterMetricFamily(metric, f"KV cache migrations into this decode instance: "
                                            f"{what}", labels=["model_name", "instance"])
            for s in stats:
                if key in s:
                    f.add_metric([self.model_name, s["instance"]], s[key])
            yield f
