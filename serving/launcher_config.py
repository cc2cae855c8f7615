"""Command-line flags of `python -m serving` and how they become an EngineConfig.

Engine flags are generated from EngineConfig's fields (`context_tensor_parallel_size` ->
`--context-tensor-parallel-size`), so they carry DistServe's names and never drift from the
config. Precedence, lowest first: EngineConfig defaults < launcher defaults < --config FILE <
flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Sequence

from dsjax.config import DTYPES, ENGINE_MODES, WARMUP_ALL, EngineConfig
from serving.admission import DEFAULT_MAX_QUEUE, DEFAULT_TPOT_SLO, SLO_MULTIPLE
from serving.chat_template import load_chat_template
from serving.connections import DEFAULT_MAX_BODY_BYTES, HttpLimits

log = logging.getLogger("serving")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8400            # DistServe's port
DEFAULT_CPU_DEVICES = 2        # virtual CPU devices: one prefill and one decode instance

# What the launcher changes relative to EngineConfig's own defaults.
# The server compiles, before /health turns ready, every program a request can reach: prompts
# and contexts of any length the model takes, any batch up to the instance's limits
# (WARMUP_ALL = -1), so no request compiles after ready. JAX's compilation cache makes a
# restart cheap. --warmup-max-prompt-len etc. narrow it.
LAUNCHER_DEFAULTS = {"log_status": True, "warmup_max_prompt_len": WARMUP_ALL,
                     "warmup_max_context_len": WARMUP_ALL, "warmup_max_prefill_batch": WARMUP_ALL,
                     "warmup_max_decode_batch": WARMUP_ALL}

ENGINE_HELP = {
    "model": "Hugging Face OPT directory, or a size name from configs/opt.toml (dummy weights)",
    "tokenizer": "tokenizer directory (default: the model's; GPT-2 BPE when it has none)",
    "dtype": "parameter and KV cache dtype",
    "load_format": "auto | dummy | safetensors | pt | orbax",
    "seed": "seed for dummy weights and for requests that carry no seed",
    "mode": "disaggregated (DistServe), colocated (vLLM-style baseline) or chunked prefill",
    "num_blocks": "KV blocks per instance, overriding the memory-derived count",
    "cpu_kv_cache_bytes": "KV cache bytes per device on a CPU-only machine (0: 30%% of the "
                          "memory available at start over the engine's devices, 256 MiB-4 GiB "
                          "each)",
    "swap_space": "GiB of host memory per decode instance for swapped-out KV",
    "log_status": "print each instance's status line once per second",
    "warmup_max_prompt_len": f"compile prefill programs for prompts up to this length before "
                             f"serving ({WARMUP_ALL}: any length the model takes; 0: no warm-up)",
    "warmup_max_context_len": f"compile decode programs for contexts up to this length "
                              f"({WARMUP_ALL}: the model's whole context)",
    "warmup_max_prefill_batch": f"prompts per prefill step to warm ({WARMUP_ALL}: the limit)",
    "warmup_max_decode_batch": f"decode rows per step to warm ({WARMUP_ALL}: the limit)",
}

# DistServe flags with nothing to configure here: accepted so its scripts run unchanged.
DISTSERVE_NO_OPS = {"--context-sched-policy": ["fcfs"], "--decoding-sched-policy": ["fcfs"]}


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _scalar_type(annotation) -> type:
    """int | None -> int; the engine config only holds scalars."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _add_engine_flags(group: argparse._ArgumentGroup, defaults: dict) -> None:
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        kind = _scalar_type(hints[field.name])
        help_text = ENGINE_HELP.get(field.name, "")
        default = defaults.get(field.name, field.default)
        help_text = f"{help_text} (default: {default})".strip()
        if kind is bool:
            group.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
            continue
        choices = {"mode": ENGINE_MODES, "dtype": DTYPES}.get(field.name)
        group.add_argument(_flag(field.name), type=kind, default=None, choices=choices,
                           help=help_text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve a model (OPT, LLaMA, Mistral, Qwen, GPT-2) over HTTP: DistServe's "
                    "POST /generate and the OpenAI-compatible POST /v1/completions (see "
                    "docs/serving.md). With no "
                    "argument: dummy-weight opt-125m, one prefill and one decode instance.")
    server = p.add_argument_group("server")
    server.add_argument("--host", default=DEFAULT_HOST)
    server.add_argument("--port", type=int, default=DEFAULT_PORT)
    server.add_argument("--api-key", default=os.environ.get("DSJAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                             "(default: $DSJAX_API_KEY, else no key)")
    server.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                        help="Host header names served; '*' serves any (default: localhost, "
                             "127.0.0.1, ::1 and --host): guards a local server against DNS "
                             "rebinding")
    admission = p.add_argument_group("admission (503 + Retry-After past these)")
    admission.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                           help="requests admitted and not finished (default: %(default)s)")
    admission.add_argument("--tpot-slo", type=float, default=DEFAULT_TPOT_SLO,
                           help="seconds per output token after the first that requests should "
                                "meet (default: %(default)s, the paper's OPT-66B chatbot SLO); "
                                "the TTFT SLO is the engine's --ttft-slo")
    admission.add_argument("--slo-multiple", type=float, default=SLO_MULTIPLE,
                           help="refuse a request estimated to take more than this multiple of "
                                "either SLO (default: %(default)s)")
    admission.add_argument("--max-queue-delay", type=float, default=None,
                           help="the bound on the estimated time to first token, overriding "
                                "--slo-multiple x --ttft-slo ('inf': none)")
    admission.add_argument("--max-tpot", type=float, default=None,
                           help="the bound on the estimated time per output token, overriding "
                                "--slo-multiple x --tpot-slo ('inf': none)")
    limits = p.add_argument_group("HTTP limits")
    limits.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted (413 above)")
    limits.add_argument("--header-timeout", type=float, default=HttpLimits.header_timeout,
                        help="seconds a connection has to send a request's headers, from its "
                             "start or its previous answer; idle keep-alive connections close "
                             "after it too (default: %(default)s)")
    limits.add_argument("--body-timeout", type=float, default=HttpLimits.body_timeout,
                        help="seconds a request has to send its body (408 after; default: "
                             "%(default)s)")
    limits.add_argument("--max-connections", type=int, default=HttpLimits.max_connections,
                        help="connections open at once; past it a new one closes the oldest "
                             "idle connection, or gets 503 when all are busy (default: "
                             "%(default)s)")
    limits.add_argument("--max-client-connections", type=int,
                        default=HttpLimits.max_client_connections,
                        help="connections open at once from one client address, with the same "
                             "rule (default: %(default)s)")
    server.add_argument("--skip-warmup", action="store_true",
                        help="do not send one tiny request through the engine before serving")
    add_model_arguments(p)
    return p


def add_model_arguments(p: argparse.ArgumentParser, defaults: dict = LAUNCHER_DEFAULTS) -> None:
    """The model and engine flags, which `python -m serving` and `python -m serving.run_batch`
    share; `defaults` (what the program changes from EngineConfig's) shows in the help."""
    model = p.add_argument_group("model")
    model.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       dest="served_model_names",
                       help="names clients use for the model; the first is the default and "
                            "the metrics' model_name (default: --model, then its size name)")
    model.add_argument("--chat-template", default=None, metavar="FILE",
                       help="Jinja chat template for /v1/chat/completions, a file or the "
                            "template itself (default: the tokenizer directory's)")
    model.add_argument("--config", default=None, metavar="FILE",
                       help="TOML file of engine settings (keys = EngineConfig field names, "
                            "e.g. the placement search's output); flags given here override it")
    engine = p.add_argument_group("engine (DistServe's flag names)")
    _add_engine_flags(engine, defaults)
    engine.add_argument("--use-dummy-weights", action="store_true",
                        help="random weights; the same as --load-format dummy")
    engine.add_argument("--trust-remote-code", action="store_true", help="accepted; no effect")
    for flag, choices in DISTSERVE_NO_OPS.items():
        engine.add_argument(flag, choices=choices, default=choices[0],
                            help="accepted for DistServe's scripts; FCFS is the only policy")


def _flag_overrides(args: argparse.Namespace) -> dict:
    """Engine settings given on the command line (flags left at None were not given)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.use_dummy_weights:
        if given.get("load_format", "dummy") != "dummy":
            raise ValueError(f"--use-dummy-weights contradicts --load-format "
                             f"{given['load_format']}: give only one of them")
        given["load_format"] = "dummy"
    return given


def _read_config_file(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, "rb") as f:
        return tomllib.load(f)


def engine_config_from_args(args: argparse.Namespace,
                            defaults: dict = LAUNCHER_DEFAULTS) -> EngineConfig:
    settings = dict(defaults)
    if args.config:
        settings.update(_read_config_file(args.config))
    settings.update(_flag_overrides(args))
    if "load_format" not in settings and not Path(settings.get("model", "opt-125m")).is_dir():
        # A size name has no checkpoint to read: serve random weights instead of failing.
        log.info("model %r is not a directory: using dummy weights",
                 settings.get("model", EngineConfig.model))
        settings["load_format"] = "dummy"
    return EngineConfig.from_dict(settings)


def devices_needed(config: EngineConfig) -> int:
    """Devices the placement of `config` occupies (prefill instances first, then decode)."""
    prefill = config.num_prefill_instances * (config.context_tensor_parallel_size *
                                              config.context_pipeline_parallel_size)
    if config.mode != "disaggregated":
        return config.context_tensor_parallel_size * config.context_pipeline_parallel_size
    return prefill + config.num_decode_instances * (config.decoding_tensor_parallel_size *
                                                    config.decoding_pipeline_parallel_size)


def xla_flags_with_cpu_devices(existing: str, count: int) -> str:
    """XLA_FLAGS asking for `count` virtual CPU devices, unless the user already chose a count.

    The flag only shapes the host (CPU) platform, so it is harmless where accelerators exist.
    """
    if re.search(r"--xla_force_host_platform_device_count=", existing):
        return existing
    return f"{existing} --xla_force_host_platform_device_count={count}".strip()


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str
    port: int
    api_key: str | None
    max_queue: int
    max_body_bytes: int
    warmup: bool
    max_queue_delay: float
    max_tpot: float
    limits: HttpLimits
    allowed_hosts: tuple[str, ...] | None
    served_model_names: tuple[str, ...] | None
    chat_template: str | None

    def app_settings(self) -> dict:
        """Keyword arguments of serving.api_server.create_app."""
        return {"api_key": self.api_key, "max_queue": self.max_queue,
                "max_body_bytes": self.max_body_bytes, "max_queue_delay": self.max_queue_delay,
                "max_tpot": self.max_tpot,
                "limits": self.limits, "allowed_hosts": self.allowed_hosts,
                "served_model_names": self.served_model_names,
                "chat_template": self.chat_template}


def _positive(flag: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
    return value


def server_options_from_args(args: argparse.Namespace, config: EngineConfig) -> ServerOptions:
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    for flag in ("max_connections", "max_client_connections"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, flag)}")
    if args.max_body_bytes < 1024:
        raise ValueError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    multiple = _positive("--slo-multiple", args.slo_multiple)
    delay = args.max_queue_delay
    if delay is None:
        delay = multiple * config.ttft_slo
    max_tpot = args.max_tpot
    if max_tpot is None:
        max_tpot = multiple * _positive("--tpot-slo", args.tpot_slo)
    limits = HttpLimits(_positive("--header-timeout", args.header_timeout),
                        _positive("--body-timeout", args.body_timeout), args.max_connections,
                        args.max_client_connections)
    if args.chat_template:
        load_chat_template(args.chat_template, None)   # a missing or broken template stops here
    return ServerOptions(args.host, args.port, args.api_key or None, args.max_queue,
                         args.max_body_bytes, not args.skip_warmup,
                         _positive("--max-queue-delay", delay),
                         _positive("--max-tpot", max_tpot), limits,
                         tuple(args.allowed_hosts) if args.allowed_hosts else None,
                         tuple(args.served_model_names) if args.served_model_names else None,
                         args.chat_template)


def parse_launcher_args(argv: Sequence[str] | None = None
                        ) -> tuple[EngineConfig, ServerOptions]:
    """Flags -> (engine config, server options); a bad setting exits with argparse's usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config_from_args(args)
        return config, server_options_from_args(args, config)
    except (ValueError, TypeError, FileNotFoundError, tomllib.TOMLDecodeError) as e:
        parser.error(str(e))
