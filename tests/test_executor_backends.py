"""The "mp" executor backend: each instance an OS process with its own JAX runtime and devices,
KV pulled over JAX transfer servers. Real processes; checked against transformers."""
from __future__ import annotations

import os
import signal

import pytest

from dsjax import SamplingParams
from tests._engine_helpers import generate, hf_engine, shutdown_all, wait_idle
from tests._hf_helpers import hf_greedy
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)
MP = dict(distributed_executor_backend="mp")


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


@pytest.mark.parametrize("name,placement", [
    ("tp1->2", dict(decoding_tensor_parallel_size=2)),
    ("pp2->1", dict(context_pipeline_parallel_size=2)),
    ("colocated", dict(mode="colocated")),
])
def test_mp_placement_matches_transformers(name, placement, hf_opt, hf_reference):
    engine = hf_engine(hf_opt[1], **MP, **placement)
    assert generate(engine, engine_prompts(), GREEDY) == hf_reference
    if name != "colocated":
        assert engine.migrations["count"] >= len(hf_reference)
        assert engine.migrations["bytes"] > 0


def test_mp_instances_are_processes_pinned_to_their_own_cores(hf_opt):
    engine = hf_engine(hf_opt[1], **MP, decoding_tensor_parallel_size=2)
    processes = [inst.host.process for inst in engine.instances.values()]
    assert all(p.is_alive() and p.pid != os.getpid() for p in processes)
    if len(os.sched_getaffinity(0)) >= len(processes):
        cores = [os.sched_getaffinity(p.pid) for p in processes]
        assert not set.intersection(*cores), f"instances share cores: {cores}"


def test_killing_a_decode_process_recomputes_its_requests(hf_opt, hf_reference):
    """SIGKILL one of two decode instances mid-run: its requests are recomputed on decode1
    and stream on to transformers' tokens, no gap, no duplicate; the prefill instance's pages
    held for them are freed, and the engine serves on with decode1."""
    from dsjax.config import EngineConfig
    from dsjax.engine.core import Engine
    from tests._engine_helpers import TINY
    engine = Engine(EngineConfig(**{**TINY, "model": str(hf_opt[1]), "load_format": "auto",
                                    **MP, "num_decode_instances": 2}))
    try:
        long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        streams = [engine.add_request(p, long) for p in engine_prompts()[:4]]
        first = next(iter(streams[0]))            # decoding has started somewhere
        assert first.new_token_ids
        os.kill(engine.instances["decode0"].host.process.pid, signal.SIGKILL)
        for stream, prompt in zip(streams, engine_prompts()):
            streamed = list(first.new_token_ids) if stream is streams[0] else []
            streamed += [t for o in stream for t in o.new_token_ids]
            assert streamed == stream.final.token_ids == hf_greedy(hf_opt[0], prompt, 60)
        assert engine.recomputations > 0, "no request was on the killed instance"
        health = engine.health()
        assert health["ok"] and "exited" in health["instances"]["decode0"]
        assert generate(engine, engine_prompts(), GREEDY) == hf_reference
        assert engine.blocks_in_use()["prefill0"] == 0
        wait_idle(engine)
    finally:
        engine.shutdown()
