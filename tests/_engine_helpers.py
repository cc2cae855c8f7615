"""Shared engine fixtures: tiny engines built once per configuration per session."""
from __future__ import annotations

import contextlib
import time

from dsjax.config import EngineConfig
from dsjax.engine.core import Engine

# Decode batches padded to 8 rows at least: fewer programs to compile than the CPU default
# (1, 2, 3, 4, 6, 8, 16, ...) needs. The tests marked "1-row buckets" keep that default.
TINY = dict(model="opt-tiny", load_format="dummy", dtype="float32", block_size=4,
            num_blocks=96, context_max_tokens_per_batch=256, max_num_blocks_per_req=64,
            min_decode_rows=8)

_ENGINES: dict[tuple, Engine] = {}


def get_engine(**overrides) -> Engine:
    """A running engine for these settings, shared across tests (compiles are the slow part)."""
    key = tuple(sorted(overrides.items()))
    if key not in _ENGINES:
        _ENGINES[key] = Engine(EngineConfig(**{**TINY, **overrides}))
    return _ENGINES[key]


def hf_engine(model_dir, **overrides) -> Engine:
    """A shared engine serving the transformers-written checkpoint in `model_dir`."""
    return get_engine(model=str(model_dir), load_format="auto", **overrides)


def shutdown_all() -> None:
    for engine in _ENGINES.values():
        engine.shutdown()
    _ENGINES.clear()


def generate(engine, prompt_list, params, timeout: float = 300) -> list[list[int]]:
    """Greedy (or seeded) tokens of each prompt, submitted together; checks nothing leaked."""
    streams = [engine.add_request(p, params) for p in prompt_list]
    outs = [s.result(timeout=timeout) for s in streams]
    wait_idle(engine)
    return [o.token_ids for o in outs]


def wait_idle(engine: Engine, timeout: float = 60.0) -> None:
    """Wait until no request is left and assert every block of every instance is free."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.has_unfinished() and not any(engine.blocks_in_use().values()):
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: blocks in use {engine.blocks_in_use()}, "
                         f"stats {engine.stats()}")


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def outcomes_after_a_kill(streams, dead: str, max_tokens: int) -> int:
    """Wait for every stream after instance `dead` was killed: each either completes all its
    tokens or fails naming the dead instance. Returns how many failed."""
    from dsjax.engine.core import EngineError
    failed = 0
    for s in streams:
        try:
            assert len(s.result(timeout=120).token_ids) == max_tokens
        except EngineError as e:
            assert dead in str(e)
            failed += 1
    return failed


def add_after_tokens(stream, n: int, submit):
    """Consume `stream`; after its n-th token call submit() once. Returns submit's result."""
    seen, late = 0, None
    for out in stream:
        seen += len(out.new_token_ids)
        if late is None and seen >= n:
            late = submit()
    return late


@contextlib.contextmanager
def watch_swaps(engine):
    """Yields a list that gets, for each request a swap moves to the host, what the host
    then keeps: (page counts of its arrays, head counts of its arrays, its host blocks,
    whether every array owns its memory)."""
    held = []

    def watch(worker):
        apply = worker._apply_swaps

        def applying(step):
            apply(step)
            for r in step.swap_out:
                arrays = [a for stage in worker.swapped_pages[r.request_id] for a in stage]
                held.append(({a.shape[1] for a in arrays}, {a.shape[3] for a in arrays},
                             len(worker.blocks.host_tables[r.request_id]),
                             all(a.flags.owndata for a in arrays)))
        worker._apply_swaps = applying
        return apply
    workers = [w for w in map(engine.local_worker, engine.instances)
               if hasattr(w, "swapped_pages")]
    originals = [watch(w) for w in workers]
    try:
        yield held
    finally:
        for w, apply in zip(workers, originals):
            w._apply_swaps = apply
