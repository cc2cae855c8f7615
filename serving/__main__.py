"""`python -m serving`: build the engine, serve HTTP, stop cleanly on SIGINT/SIGTERM.

JAX is imported only after the flags are read, so that on a CPU-only machine the placement's
virtual devices can be asked for in XLA_FLAGS first.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Sequence

from serving.launcher_config import (DEFAULT_CPU_DEVICES, ServerOptions, devices_needed,
                                     parse_launcher_args, xla_flags_with_cpu_devices)

log = logging.getLogger("serving")


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(engine, options: ServerOptions) -> None:
    from serving.api_server import CLIENT, create_app, start_server, stop_server
    app = create_app(engine, **options.app_settings())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, port = await start_server(app, options.host, options.port)
    log.info("serving %s (%s mode) on http://%s:%d%s", engine.config.model, engine.config.mode,
             options.host, port, " (API key required)" if options.api_key else "")
    await stop.wait()
    log.info("stopping: refusing new requests, aborting %d in flight", app[CLIENT].num_active)
    await stop_server(app, runner)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    config, options = parse_launcher_args(argv)
    configure_logging()
    # Until the server's loop takes over the signals, SIGTERM stops startup like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ["XLA_FLAGS"] = xla_flags_with_cpu_devices(
        os.environ.get("XLA_FLAGS", ""), max(DEFAULT_CPU_DEVICES, devices_needed(config)))
    from dsjax.engine.core import Engine  # imports JAX: after XLA_FLAGS is final
    if not options.warmup:
        config = dataclasses.replace(config, warmup_max_prompt_len=0)
    started = time.perf_counter()
    try:
        engine = Engine(config)   # compiles the configured workload's programs before ready
    except KeyboardInterrupt:
        return 0
    log.info("engine ready in %.1f s: %s", time.perf_counter() - started,
             ", ".join(f"{s['instance']} ({s['blocks_total']} KV blocks)" for s in engine.stats()))
    try:
        asyncio.run(serve(engine, options))
    except KeyboardInterrupt:
        log.info("interrupted before serving")
    finally:
        engine.shutdown()
    log.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
