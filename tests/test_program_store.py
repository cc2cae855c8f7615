"""Step programs and page copies (and a pipeline's token selections) stored on disk: a second
engine loads them (no tracing, no lowering), rehearses its warm-up on them, and still gives
transformers' greedy tokens; a damaged file, or one whose program fails on its first run, is
removed."""
from __future__ import annotations

import logging
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import serialize_executable

from dsjax.config import EngineConfig
from dsjax.engine.core import Engine
from dsjax.executor.compile_watch import CompileWatch
from dsjax.executor.program_store import STORE_DIRNAME, ProgramStore
from dsjax.executor.runner import Stage
from dsjax.sampling_params import SamplingParams
from tests._engine_helpers import TINY, generate
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)
# What a step program is counted as: loaded from the store, or lowered (traced and lowered).
LOADED = ("forward", "sample", "decode+sample", "gather", "insert", "select")
LOWERED = ("jit(_forward_step)", "jit(_sample_step)", "jit(_decode_sample_step)",
           "jit(_gather)", "jit(_insert)", "jit(_select_tokens)")
# Warm-up over every shape engine_prompts() reach: with it the engine rehearses its steps.
WARM = dict(warmup_max_prompt_len=32, warmup_max_context_len=48, warmup_max_prefill_batch=8,
            warmup_max_decode_batch=8)


@pytest.fixture
def own_cache(tmp_path):
    """A program store of this test's own (JAX's cache stays the session's)."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path / STORE_DIRNAME
    jax.config.update("jax_compilation_cache_dir", before)


def _serve(model_dir) -> tuple[list[list[int]], dict]:
    """Greedy tokens of engine_prompts() from a fresh warmed engine, and what the engine
    lowered or loaded from its start to its end."""
    with CompileWatch() as watch:
        engine = Engine(EngineConfig(**{**TINY, **WARM, "model": str(model_dir),
                                        "load_format": "auto"}))
        try:
            tokens = generate(engine, engine_prompts(), GREEDY)
        finally:
            engine.shutdown()
    return tokens, dict(watch.names)


def _count(names: dict, kinds) -> int:
    return sum(names.get(k, 0) for k in kinds)


def test_a_second_engine_loads_stored_programs_and_matches_transformers(
        own_cache, hf_opt, hf_reference, caplog):
    first, names = _serve(hf_opt[1])
    assert first == hf_reference
    stored = sorted(own_cache.iterdir())
    assert stored and _count(names, LOADED) == 0
    # Programs alike but for their devices (each instance's page copies) lower once and are
    # stored once per stage.
    assert 0 < _count(names, LOWERED) <= len(stored), names

    second, names = _serve(hf_opt[1])   # warm-up rehearsed on loaded programs, then served
    assert second == hf_reference
    assert _count(names, LOADED) == len(stored)   # every step program loaded, none lowered
    assert _count(names, LOWERED) == 0, names
    assert sorted(own_cache.iterdir()) == stored

    for path in stored:   # damaged files (a crash mid-write on another filesystem, a bad disk)
        path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="dsjax"):
        third, names = _serve(hf_opt[1])
    assert third == hf_reference
    assert _count(names, LOADED) == 0 and "did not load" in caplog.text
    # No damaged file is left to fail again: each is gone, or stored anew if JAX's cache did
    # not supply its program.
    assert all(not path.exists() or path.stat().st_size > 100 for path in stored)


def _cumsum_program(store, x):
    return store.program("stage", jax.devices()[:1], ("forward", "cumsum"),
                         lambda: jax.jit(lambda v: jnp.cumsum(v) * 2), (x,))


def test_a_key_with_an_address_is_not_stored(tmp_path):
    store = ProgramStore(tmp_path)
    fn, loaded_from = store.program("stage", jax.devices()[:1], ("forward", object()),
                                    lambda: jax.jit(lambda x: x + 1), (jnp.ones(3),))
    assert fn(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0] and loaded_from is None
    assert not any(tmp_path.iterdir()) and store.compiled == 0


def test_a_program_jaxs_cache_supplies_is_run_but_not_stored(tmp_path):
    """A re-serialized executable from JAX's cache would lack its code ("Function ... not
    found" when run): such a program runs, and is not stored."""
    x = jnp.arange(977.0)   # a shape no other test compiles
    fn, _ = _cumsum_program(ProgramStore(tmp_path), x)
    assert float(fn(x)[-1]) == 2 * sum(range(977))
    [stored] = list(tmp_path.iterdir())
    stored.unlink()                       # lost; JAX's cache still holds the program
    store = ProgramStore(tmp_path)
    fn, loaded_from = _cumsum_program(store, x)
    assert float(fn(x)[-1]) == 2 * sum(range(977)) and loaded_from is None
    assert store.compiled == 1 and not any(tmp_path.iterdir())


def test_a_stored_program_that_fails_on_its_first_run_is_removed(tmp_path, caplog):
    """The broken executable is a real one: re-serialized after JAX's cache loaded it."""
    x = jnp.arange(611.0)
    fn, _ = _cumsum_program(ProgramStore(tmp_path), x)
    [stored] = list(tmp_path.iterdir())
    # Compiled twice, each time a new function (no in-memory hit): the first compile fills
    # JAX's persistent cache, the second is loaded from it.
    for _ in range(2):
        again = jax.jit(lambda v: jnp.cumsum(v) * 2).lower(x).compile(
            compiler_options={"xla_debug_buffer_assignment_show_max": 7})
    payload, _, out_tree = serialize_executable.serialize(again)
    stored.write_bytes(pickle.dumps((payload, jax.tree_util.tree_unflatten(out_tree, [0]))))

    stage = object.__new__(Stage)   # only what run_program uses: a store, and no program yet
    stage.fns, stage._unproven, stage.rehearsing = {}, {}, False
    stage.programs, stage.stage_key, stage.devices = ProgramStore(tmp_path), "stage", \
        jax.devices()[:1]
    make = lambda: jax.jit(lambda v: jnp.cumsum(v) * 2)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="dsjax"), pytest.raises(Exception):
        stage.run_program(("forward", "cumsum"), make, (), x)
    assert "failed on its first run" in caplog.text and not stored.exists()
    # The broken program is forgotten too: the next call compiles it and gives NumPy's answer.
    np.testing.assert_allclose(stage.run_program(("forward", "cumsum"), make, (), x),
                               np.cumsum(np.arange(611.0)) * 2)
