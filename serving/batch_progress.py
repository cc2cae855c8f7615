"""What a person running a long batch job sees: a progress bar, the summary, a metrics file.

The bar (on a terminal; a log line every LOG_EVERY_S seconds elsewhere) counts lines written,
failed ones, output tokens/s and the ETA. The summary is one JSON object. The metrics file is
Prometheus' text format (for node_exporter's textfile collector, or to read): the server's
/metrics series (vLLM's names: tokens, request latencies, engine state) plus dsjax_batch_*
progress, rewritten atomically at every commit.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time

from prometheus_client import write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from tqdm.auto import tqdm

from serving.batch_checkpoint import Progress

log = logging.getLogger("serving.batch")

LOG_EVERY_S = 10.0
POSTFIX_EVERY_S = 0.5


class BatchProgress:
    def __init__(self, total: int, progress: Progress, model_name: str,
                 bar: bool | None = None, metrics_file: str | None = None, registry=None):
        self.total = total
        self.progress = progress
        self.model_name = model_name
        self.at_start = dataclasses.replace(progress)
        self.started = time.monotonic()
        self._shown = self.started
        show = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total, initial=progress.lines, unit="line", desc="batch",
                        disable=not show, dynamic_ncols=True, file=sys.stderr)
        self.metrics_file = metrics_file
        self.registry = registry
        if registry is not None and metrics_file:
            registry.register(_ProgressCollector(self))

    @property
    def run_seconds(self) -> float:
        return time.monotonic() - self.started

    def tokens_per_s(self) -> float:
        """Output tokens/s of this run (a resumed run counts from its own start)."""
        made = self.progress.completion_tokens - self.at_start.completion_tokens
        return made / max(self.run_seconds, 1e-9)

    def _line(self) -> str:
        p = self.progress
        return (f"{p.lines}/{self.total} lines, {p.failed} failed, "
                f"{self.tokens_per_s():.1f} output tok/s")

    def advanced(self, lines: int) -> None:
        """`lines` more lines written."""
        now = time.monotonic()
        if not self.bar.disable:
            self.bar.update(lines)
            if now - self._shown >= POSTFIX_EVERY_S:
                self._shown = now
                self.bar.set_postfix(failed=self.progress.failed,
                                     tok_s=f"{self.tokens_per_s():.1f}", refresh=False)
        elif now - self._shown >= LOG_EVERY_S:
            self._shown = now
            done = self.progress.lines - self.at_start.lines
            rate = done / max(now - self.started, 1e-9)
            eta = (self.total - self.progress.lines) / rate if rate else float("inf")
            log.info("progress: %s, ETA %s", self._line(), _duration(eta))

    def write_metrics(self) -> None:
        if self.registry is not None and self.metrics_file:
            write_to_textfile(self.metrics_file, self.registry)   # via a renamed temp file

    def summary(self, **extra) -> dict:
        p = self.progress
        return {"lines": self.total, "written": p.lines, "succeeded": p.succeeded,
                "failed": p.failed, "resumed_from": self.at_start.lines,
                "prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens,
                "run_seconds": round(self.run_seconds, 3),
                "run_output_tokens_per_s": round(self.tokens_per_s(), 2),
                "all_runs_seconds": round(p.seconds, 3), **extra}

    def close(self) -> None:
        self.bar.close()
        log.info("batch: %s in %s", self._line(), _duration(self.run_seconds))


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}"


class _ProgressCollector:
    """dsjax_batch_* gauges, read when the metrics file is written."""

    def __init__(self, reporter: BatchProgress):
        self.reporter = reporter

    def describe(self):
        return []

    def collect(self):
        r, p = self.reporter, self.reporter.progress
        lines = GaugeMetricFamily("dsjax_batch_lines", "input lines of this shard, by state",
                                  labels=["model_name", "state"])
        for state, value in (("total", r.total), ("written", p.lines),
                             ("succeeded", p.succeeded), ("failed", p.failed)):
            lines.add_metric([r.model_name, state], value)
        yield lines
        rate = GaugeMetricFamily("dsjax_batch_output_tokens_per_second",
                                 "output tokens per second of this run", labels=["model_name"])
        rate.add_metric([r.model_name], r.tokens_per_s())
        yield rate
