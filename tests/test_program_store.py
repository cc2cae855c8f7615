"""Step programs stored on disk: a second engine loads them (no tracing, no lowering) and
still gives transformers' greedy tokens; a damaged file is compiled again and removed."""
from __future__ import annotations

import logging

import jax
import pytest

from dsjax.config import EngineConfig
from dsjax.engine.core import Engine
from dsjax.executor.compile_watch import CompileWatch
from dsjax.executor.program_store import STORE_DIRNAME, ProgramStore
from dsjax.sampling_params import SamplingParams
from tests._engine_helpers import TINY, generate
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)
STEP_PROGRAMS = ("forward", "sample", "decode+sample")   # the names a load is counted under
STEP_LOWERINGS = ("jit(_forward_step)", "jit(_sample_step)", "jit(_decode_sample_step)")


@pytest.fixture
def own_cache(tmp_path):
    """A compilation cache (and so a program store) of this test's own."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path / STORE_DIRNAME
    jax.config.update("jax_compilation_cache_dir", before)


def _serve(model_dir) -> tuple[list[list[int]], dict]:
    """Greedy tokens of engine_prompts() from a fresh engine (warm-up off: each program is
    made on first use), and what it lowered or loaded while serving them."""
    engine = Engine(EngineConfig(**{**TINY, "model": str(model_dir), "load_format": "auto"}))
    try:
        with CompileWatch() as watch:
            tokens = generate(engine, engine_prompts(), GREEDY)
    finally:
        engine.shutdown()
    return tokens, dict(watch.names)


def _loads(names: dict) -> int:
    return sum(names.get(k, 0) for k in STEP_PROGRAMS)


def _lowerings(names: dict) -> int:
    return sum(names.get(k, 0) for k in STEP_LOWERINGS)


def test_a_second_engine_loads_stored_programs_and_matches_transformers(
        own_cache, hf_opt, hf_reference, caplog):
    first, names = _serve(hf_opt[1])
    assert first == hf_reference
    stored = sorted(own_cache.iterdir())
    assert stored and _loads(names) == 0
    assert _lowerings(names) == len(stored), names

    second, names = _serve(hf_opt[1])
    assert second == hf_reference
    assert _loads(names) == len(stored)   # every step program loaded, none lowered again
    assert _lowerings(names) == 0, names
    assert sorted(own_cache.iterdir()) == stored

    for path in stored:   # damaged files (a crash mid-write on another filesystem, a bad disk)
        path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="dsjax"):
        third, names = _serve(hf_opt[1])
    assert third == hf_reference
    assert _loads(names) == 0 and "did not load" in caplog.text
    # No damaged file is left to fail again: each is gone, or stored anew if JAX's cache did
    # not supply its program.
    assert all(not path.exists() or path.stat().st_size > 100 for path in stored)


def test_a_key_with_an_address_is_not_stored(tmp_path):
    store = ProgramStore(tmp_path)
    fn = store.program("stage", jax.devices()[:1], ("forward", object()),
                       lambda: jax.jit(lambda x: x + 1), (jax.numpy.ones(3),))
    assert fn(jax.numpy.ones(3)).tolist() == [2.0, 2.0, 2.0]
    assert not any(tmp_path.iterdir()) and store.compiled == 0


def test_a_program_jaxs_cache_supplies_is_run_but_not_stored(tmp_path):
    """A re-serialized executable from JAX's cache would lack its code ("Function ... not
    found" when loaded): such a program runs, and is not stored."""
    x = jax.numpy.arange(977.0)   # a shape no other test compiles

    def program(store):
        return store.program("stage", jax.devices()[:1], ("forward", "cumsum"),
                             lambda: jax.jit(lambda v: jax.numpy.cumsum(v) * 2), (x,))

    store = ProgramStore(tmp_path)
    assert float(program(store)(x)[-1]) == 2 * sum(range(977))
    [stored] = list(tmp_path.iterdir())
    stored.unlink()                       # lost; JAX's cache still holds the program
    store = ProgramStore(tmp_path)
    assert float(program(store)(x)[-1]) == 2 * sum(range(977))
    assert store.compiled == 1 and not any(tmp_path.iterdir())
