"""`python -m serving.run_batch -i INPUT -o OUTPUT [--resume]`: an OpenAI batch file, offline.

vLLM's run_batch, resumable: the same input and output formats (serving/batch_lines.py), the
engine and model flags of `python -m serving`, and a checkpoint beside the output
(OUTPUT.ckpt) from which `--resume` continues after a crash or a kill, with no line lost or
written twice. SIGINT and SIGTERM stop it cleanly: the lines written so far are committed.
Exit status: 0 when every line is written, 1 when it failed (the message says why), 128 +
the signal's number when a signal stopped it (run again with --resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import tomllib
from typing import Sequence

from serving.__main__ import configure_logging
from serving.launcher_config import (DEFAULT_CPU_DEVICES, LAUNCHER_DEFAULTS, add_model_arguments,
                                     devices_needed, engine_config_from_args,
                                     xla_flags_with_cpu_devices)

log = logging.getLogger("serving.batch")

# The server's defaults, less its once-a-second status lines (the progress bar says it), and
# colocated: a batch has no latency SLO for disaggregation to protect, and on the measured
# machine colocated made 1.2-1.4x the output tokens/s (docs/benchmarks.md#offline-batch-inference).
BATCH_DEFAULTS = {**LAUNCHER_DEFAULTS, "log_status": False, "mode": "colocated"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.run_batch",
        description="Run an OpenAI batch file (JSONL of {custom_id, method, url, body}, url "
                    "/v1/completions or /v1/chat/completions) through the engine, offline; "
                    "write one output line per input line, in input order (see docs/serving.md)")
    batch = p.add_argument_group("batch")
    batch.add_argument("-i", "--input-file", required=True, metavar="INPUT")
    batch.add_argument("-o", "--output-file", required=True, metavar="OUTPUT")
    batch.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint (if there is one): the output is cut "
                            "back to its committed lines and the run goes on from there")
    batch.add_argument("--overwrite", action="store_true",
                       help="start over even if the checkpoint holds an unfinished run")
    batch.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                       help="orbax checkpoints and the input's line index (default: "
                            "OUTPUT.ckpt)")
    batch.add_argument("--checkpoint-interval", type=float, default=5.0, metavar="SECONDS",
                       help="seconds between commits (default: %(default)s)")
    batch.add_argument("--num-shards", type=int, default=1,
                       help="split the input into this many contiguous shards, one per process "
                            "or host (grain's ShardOptions); each writes its own OUTPUT")
    batch.add_argument("--shard-index", type=int, default=0,
                       help="this process's shard, in [0, --num-shards)")
    batch.add_argument("--window", type=int, default=None,
                       help="lines between the oldest not yet written and the newest read: "
                            "bounds memory (default: 2 x --decoding-max-batch-size)")
    batch.add_argument("--reader-threads", type=int, default=2,
                       help="grain threads that parse, check and tokenize (default: "
                            "%(default)s)")
    batch.add_argument("--prefetch", type=int, default=64,
                       help="lines grain prepares ahead (default: %(default)s)")
    batch.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar (default: when stderr is a terminal; log "
                            "lines otherwise)")
    batch.add_argument("--metrics-file", default=None, metavar="FILE",
                       help="write Prometheus metrics (the server's, plus dsjax_batch_*) here "
                            "at every commit")
    batch.add_argument("--skip-warmup", action="store_true",
                       help="compile nothing before the first line (programs compile as "
                            "shapes come)")
    add_model_arguments(p, BATCH_DEFAULTS)
    return p


def batch_options(args: argparse.Namespace):
    """BatchOptions from the flags (imports grain, and with it JAX: after XLA_FLAGS is set)."""
    from serving.batch_runner import BatchOptions
    options = BatchOptions(
        input=args.input_file, output=args.output_file, resume=args.resume,
        overwrite=args.overwrite, checkpoint_dir=args.checkpoint_dir,
        checkpoint_interval=args.checkpoint_interval, num_shards=args.num_shards,
        shard_index=args.shard_index, window=args.window, reader_threads=args.reader_threads,
        prefetch=args.prefetch, progress_bar=args.progress_bar, metrics_file=args.metrics_file,
        served_model_names=tuple(args.served_model_names or ()) or None,
        chat_template=args.chat_template)
    _check(options)
    return options


def _check(options) -> None:
    options.shard()   # grain's ShardOptions checks the index and count
    if not os.path.isfile(options.input):
        raise FileNotFoundError(f"input file {options.input} does not exist")
    for flag, value, low in (("--checkpoint-interval", options.checkpoint_interval, 0.01),
                             ("--reader-threads", options.reader_threads, 1),
                             ("--prefetch", options.prefetch, 1),
                             ("--window", options.window, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if options.resume and options.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: give one")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _signal_status(name: str) -> int:
    """128 + the signal's number, as a shell reports a process a signal stopped."""
    return 128 + getattr(signal.Signals, name or "SIGINT", signal.SIGINT).value


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()   # before grain is imported: it gives the root logger a handler
    logging.getLogger("absl").setLevel(logging.WARNING)   # orbax logs every file it writes
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config_from_args(args, BATCH_DEFAULTS)
        if args.skip_warmup:
            config = dataclasses.replace(config, warmup_max_prompt_len=0)
        os.environ["XLA_FLAGS"] = xla_flags_with_cpu_devices(
            os.environ.get("XLA_FLAGS", ""), max(DEFAULT_CPU_DEVICES, devices_needed(config)))
        options = batch_options(args)
    except (ValueError, TypeError, FileNotFoundError, tomllib.TOMLDecodeError) as e:
        parser.error(str(e))
    from serving.batch_checkpoint import BatchError
    from serving.batch_runner import open_batch, run_batch
    try:
        files = open_batch(options)
    except BatchError as e:
        log.error("%s", e)
        return 1
    # Until the run's loop takes over the signals, SIGTERM stops startup like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    from dsjax.engine.core import Engine
    started = time.perf_counter()
    try:
        engine = Engine(config)
    except KeyboardInterrupt as e:   # Ctrl-C (no name) or SIGTERM while compiling
        log.info("interrupted during start-up: nothing was answered or committed")
        logging.shutdown()
        # The engine's threads are still compiling and cannot be joined; Python's exit would
        # abort inside them. Nothing is left to commit, so leave at once.
        os._exit(_signal_status(str(e)))
    log.info("engine ready in %.1f s (%s mode)", time.perf_counter() - started, config.mode)
    try:
        summary = run_batch(engine, options, handle_signals=True, files=files)
    finally:
        engine.shutdown()
    print(json.dumps(summary), flush=True)
    if summary["error"]:
        log.error("%s; %d lines are committed: fix the cause and run again with --resume",
                  summary["error"], summary["written"])
        return 1
    if summary["stopped"]:
        log.info("stopped by %s: %d of %d lines committed; run again with --resume to go on",
                 summary["stopped"], summary["written"], summary["lines"])
        return _signal_status(summary["stopped"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
