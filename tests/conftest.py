"""Tests run on CPU with 8 virtual devices; this must happen before JAX initialises."""
import os
import tempfile

# LLVM at -O0: the suite compiles thousands of tiny programs whose run time is nothing, and
# compiling at the default level took 40% longer (the numerics do not change: no fast math).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One compilation cache for the session: engines of the same model and shapes (many tests build
# them) compile each program once. A fresh directory keeps runs independent of each other.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="dsjax-tests-xla-"))
# Every program, however quick its compile: the tiny models' programs each take under the
# default 1 s, and there are thousands of them.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Prompts of mixed lengths and the number of tokens every placement test generates.
ENGINE_PROMPT_LENGTHS = (3, 17, 9, 30, 5, 12)
ENGINE_MAX_NEW = 12


def engine_prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(4, 1000, n).tolist() for n in ENGINE_PROMPT_LENGTHS]


@pytest.fixture(scope="session")
def hf_opt(tmp_path_factory):
    """(transformers model, its safetensors directory): a random OPT whose greedy tokens vary."""
    from tests._hf_helpers import make_varied_hf_opt, save_safetensors
    model = make_varied_hf_opt()
    return model, save_safetensors(model, tmp_path_factory.mktemp("hf-opt") / "opt")


@pytest.fixture(scope="session")
def hf_reference(hf_opt):
    """transformers' own greedy continuations of engine_prompts()."""
    from tests._hf_helpers import hf_greedy
    return [hf_greedy(hf_opt[0], p, ENGINE_MAX_NEW) for p in engine_prompts()]


@pytest.fixture(scope="module")
def loop():
    """A server event loop around a tiny engine, per test module (a module may override it)."""
    from tests._server_helpers import ServerLoop, tiny_engine
    engine = tiny_engine()
    server_loop = ServerLoop(engine)
    yield server_loop
    server_loop.close()
    engine.shutdown()
