"""A bounded chaos test under load (benchmarks/chaos.py is the long run): on the mp backend,
instance processes are frozen, delayed and killed while greedy requests stream. Afterwards no
request hangs, every completed request gives transformers' own tokens (recomputed ones
included), no live instance holds a block, and no instance process outlives the engine."""
from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.chaos import orphans, run_chaos
from tests._engine_helpers import TINY
from tests._hf_helpers import hf_greedy


@pytest.mark.slow
def test_chaos_under_load_loses_nothing(hf_opt):
    from dsjax import Engine, EngineConfig
    model, path = hf_opt
    rng = np.random.default_rng(4)
    prompts = [rng.integers(4, 1000, int(n)).tolist() for n in rng.integers(3, 30, 24)]
    references = [hf_greedy(model, p, 16) for p in prompts]
    engine = Engine(EngineConfig(**{**TINY, "model": str(path), "load_format": "auto",
                                    "num_blocks": 160, "distributed_executor_backend": "mp",
                                    "num_prefill_instances": 2, "num_decode_instances": 2,
                                    "kv_pull_timeout_s": 5.0}))
    pids = [i.host.process.pid for i in engine.instances.values()]
    try:
        figures = run_chaos(engine, prompts, references, random.Random(7), max_tokens=16)
    finally:
        engine.shutdown()
    assert figures["freezes"] + len(figures["kills"]) > 0, figures
    assert figures["completed"] + figures["failed"] == len(prompts), figures
    assert figures["failed"] == 0, figures   # a peer of each phase always remained
    assert figures["hung"] == 0 and figures["blocks_leaked"] == 0, figures
    assert orphans(pids) == []
