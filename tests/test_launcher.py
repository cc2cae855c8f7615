"""`python -m serving` flags -> EngineConfig and server options, without starting an engine."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

from dsjax.config import EngineConfig
from serving.api_server import create_app
from serving.connections import HttpLimits
from serving.launcher_config import (LAUNCHER_DEFAULTS, DEFAULT_PORT, devices_needed, parse_launcher_args,
                                     xla_flags_with_cpu_devices)

# The flags of DistServe's api server and artifact scripts, with a value each.
DISTSERVE_FLAGS = {
    "--model": ("opt-13b", "model"), "--tokenizer": ("/tok", "tokenizer"),
    "--dtype": ("float16", "dtype"), "--seed": ("7", "seed"),
    "--context-tensor-parallel-size": ("2", "context_tensor_parallel_size"),
    "--context-pipeline-parallel-size": ("3", "context_pipeline_parallel_size"),
    "--decoding-tensor-parallel-size": ("4", "decoding_tensor_parallel_size"),
    "--decoding-pipeline-parallel-size": ("5", "decoding_pipeline_parallel_size"),
    "--block-size": ("32", "block_size"),
    "--max-num-blocks-per-req": ("128", "max_num_blocks_per_req"),
    "--gpu-memory-utilization": ("0.95", "gpu_memory_utilization"),
    "--swap-space": ("16", "swap_space"),
    "--context-max-batch-size": ("64", "context_max_batch_size"),
    "--context-max-tokens-per-batch": ("8192", "context_max_tokens_per_batch"),
    "--decoding-max-batch-size": ("512", "decoding_max_batch_size"),
    "--decoding-max-tokens-per-batch": ("32768", "decoding_max_tokens_per_batch"),
    "--mode": ("colocated", "mode"), "--num-prefill-instances": ("2", "num_prefill_instances"),
    "--num-decode-instances": ("3", "num_decode_instances"),
    "--attention-backend": ("xla", "attention_backend"),
}


def test_no_argument_serves_dummy_opt_125m_on_port_8400():
    config, options = parse_launcher_args([])
    assert (config.model, config.load_format, config.log_status) == ("opt-125m", "dummy", True)
    assert (options.host, options.port, options.api_key) == ("127.0.0.1", DEFAULT_PORT, None)
    assert options.warmup


def test_distserve_flag_names_set_their_engine_fields():
    argv = [a for flag, (value, _) in DISTSERVE_FLAGS.items() for a in (flag, value)]
    config, _ = parse_launcher_args(argv + ["--use-dummy-weights", "--trust-remote-code",
                                            "--context-sched-policy", "fcfs"])
    for flag, (value, field) in DISTSERVE_FLAGS.items():
        got = getattr(config, field)
        assert str(got) == value or got == type(got)(value), flag


def test_use_dummy_weights_is_load_format_dummy():
    by_flag, _ = parse_launcher_args(["--model", "opt-tiny", "--use-dummy-weights"])
    by_format, _ = parse_launcher_args(["--model", "opt-tiny", "--load-format", "dummy"])
    assert by_flag == by_format and by_flag.load_format == "dummy"


def test_contradicting_weight_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_launcher_args(["--use-dummy-weights", "--load-format", "safetensors"])
    assert "--use-dummy-weights contradicts --load-format safetensors" in capsys.readouterr().err


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "placement.toml"
    path.write_text('model = "opt-tiny"\nmode = "colocated"\nblock_size = 32\n'
                    'decoding_max_batch_size = 64\nlog_status = false\n')
    config, _ = parse_launcher_args(["--config", str(path), "--block-size", "8",
                                     "--log-status"])
    expected = dataclasses.replace(EngineConfig(), **{
        **LAUNCHER_DEFAULTS, "model": "opt-tiny", "mode": "colocated", "block_size": 8,
        "decoding_max_batch_size": 64, "log_status": True, "load_format": "dummy"})
    assert config == expected


@pytest.mark.parametrize("content,message", [
    ("blok_size = 8\n", "unknown engine settings ['blok_size']"),
    ('mode = "fast"\n', "mode must be one of"),
    ("min_decode_rows = 6\n", "min_decode_rows must be 0 (by platform) or a power of two"),
    ("min_decode_rows = 512\n", "min_decode_rows (512) exceeds decoding_max_batch_size (256)"),
])
def test_bad_config_files_name_the_problem(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(SystemExit):
        parse_launcher_args(["--config", str(path)])
    assert message in capsys.readouterr().err


def test_bad_flags_name_the_problem(capsys):
    for argv, message in ((["--config", "/no/such.toml"], "no such file"),
                          (["--max-queue", "0"], "--max-queue must be >= 1"),
                          (["--mode", "fast"], "invalid choice")):
        with pytest.raises(SystemExit):
            parse_launcher_args(argv)
        assert message in capsys.readouterr().err


def test_server_options_from_flags(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    _, options = parse_launcher_args([
        "--host", "0.0.0.0", "--port", "9000", "--api-key", "k", "--max-queue", "3",
        "--skip-warmup", "--header-timeout", "2", "--body-timeout", "5",
        "--max-connections", "64", "--allowed-hosts", "api.example", "10.0.0.1",
        "--ttft-slo", "0.5", "--served-model-name", "chat", "org/chat",
        "--chat-template", str(template)])
    assert (options.host, options.port, options.api_key, options.max_queue) == \
        ("0.0.0.0", 9000, "k", 3)
    assert not options.warmup
    assert options.limits == HttpLimits(header_timeout=2.0, body_timeout=5.0, max_connections=64)
    assert options.allowed_hosts == ("api.example", "10.0.0.1")
    assert options.max_queue_delay == 4 * 0.5          # a stated multiple of the TTFT SLO
    assert options.served_model_names == ("chat", "org/chat")
    assert options.chat_template == str(template)
    _, explicit = parse_launcher_args(["--ttft-slo", "0.5", "--max-queue-delay", "7"])
    assert explicit.max_queue_delay == 7.0


def test_server_defaults_and_create_app_takes_every_setting():
    _, options = parse_launcher_args([])
    assert options.limits == HttpLimits(10.0, 30.0, 1024)
    assert options.max_queue_delay == 4 * 2.5
    assert (options.allowed_hosts, options.served_model_names, options.chat_template) == \
        (None, None, None)
    assert set(options.app_settings()) <= set(inspect.signature(create_app).parameters)


@pytest.mark.parametrize("argv,message", [
    (["--header-timeout", "0"], "--header-timeout must be > 0"),
    (["--body-timeout", "-1"], "--body-timeout must be > 0"),
    (["--max-connections", "0"], "--max-connections must be >= 1"),
    (["--ttft-slo", "0"], "ttft_slo must be > 0"),
    (["--chat-template", "/no/such.jinja"], "no such file"),
    (["--chat-template", "{% if %}"], "does not compile"),
])
def test_bad_server_flags_name_the_problem(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_launcher_args(argv)
    assert message in capsys.readouterr().err


def test_devices_needed_follows_the_placement():
    config, _ = parse_launcher_args(["--context-tensor-parallel-size", "2",
                                     "--decoding-pipeline-parallel-size", "2",
                                     "--num-decode-instances", "2"])
    assert devices_needed(config) == 2 + 2 * 2
    colocated, _ = parse_launcher_args(["--mode", "colocated",
                                        "--context-tensor-parallel-size", "4"])
    assert devices_needed(colocated) == 4


def test_cpu_device_count_is_appended_unless_already_chosen():
    assert xla_flags_with_cpu_devices("", 2) == "--xla_force_host_platform_device_count=2"
    assert xla_flags_with_cpu_devices("--xla_dump_to=/tmp", 3) == \
        "--xla_dump_to=/tmp --xla_force_host_platform_device_count=3"
    chosen = "--xla_force_host_platform_device_count=8"
    assert xla_flags_with_cpu_devices(chosen, 2) == chosen


def test_help_lists_distserve_flags_without_importing_jax():
    code = ("import sys; from serving.__main__ import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('JAX_IMPORTED' if 'jax' in sys.modules else 'JAX_LAZY')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "JAX_LAZY" in out
    for flag in [*DISTSERVE_FLAGS, "--use-dummy-weights", "--config", "--api-key", "--max-queue",
                 "--header-timeout", "--body-timeout", "--max-connections", "--allowed-hosts",
                 "--ttft-slo", "--max-queue-delay", "--served-model-name", "--chat-template"]:
        assert flag in out, flag
