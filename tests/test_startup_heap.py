"""An engine keeps its start-up objects out of Python's cyclic collector while it serves, and
hands them back when it stops, so a stopped engine is freed while others run
(dsjax.engine.startup_heap)."""
from __future__ import annotations

import gc
import weakref

from dsjax.config import EngineConfig
from dsjax.engine import startup_heap
from dsjax.engine.core import Engine
from tests._engine_helpers import TINY, get_engine

PYTHON_THRESHOLDS = (700, 10, 10)


def _tracked_ids() -> set[int]:
    # gc.get_objects lists the three generations the collector walks, not the frozen one.
    return {id(o) for o in gc.get_objects()}


def test_a_ready_engine_has_frozen_what_start_up_built():
    engine = get_engine()
    built = [engine.config, engine.instances, engine.model_config]
    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold()[0] >= startup_heap.YOUNG_THRESHOLD
    assert not {id(o) for o in built} & _tracked_ids()
    served = [engine.add_request([5, 6, 7], None).result(timeout=120)]   # made after ready
    assert id(served) in _tracked_ids()


def test_a_stopped_engine_is_freed_while_another_runs():
    get_engine()   # the shared engine keeps running, and holding the heap
    engine = Engine(EngineConfig(**TINY))
    assert gc.get_freeze_count() > 10_000
    pool = weakref.ref(engine.local_worker("decode0").runner.stages[0].pool)
    engine.shutdown()
    del engine
    gc.collect()
    assert pool() is None, "the stopped engine's KV pages are still held"


class _Node:
    pass


def test_a_release_hands_the_heap_back_and_the_last_restores_the_thresholds():
    holders, thresholds = startup_heap._holders, startup_heap._thresholds
    real = gc.get_threshold()
    startup_heap._holders, startup_heap._thresholds = 0, None
    gc.set_threshold(*PYTHON_THRESHOLDS)
    try:
        cycle = _Node()
        cycle.me = cycle
        alive = weakref.ref(cycle)
        startup_heap.freeze_startup_heap()   # two engines hold the heap
        startup_heap.freeze_startup_heap()
        assert gc.get_threshold()[0] == startup_heap.YOUNG_THRESHOLD
        del cycle   # garbage now, but frozen
        gc.collect()
        assert alive() is not None, "a frozen cycle must not be collected"
        startup_heap.release_startup_heap()   # one engine stops
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert alive() is None, "a release hands the frozen objects back"
        assert gc.get_threshold()[0] == startup_heap.YOUNG_THRESHOLD, "one engine still runs"
        startup_heap.release_startup_heap()   # the last one
        assert gc.get_threshold() == PYTHON_THRESHOLDS
    finally:
        startup_heap._holders, startup_heap._thresholds = holders, thresholds
        gc.set_threshold(*real)
        if holders:   # the engines still running keep theirs
            gc.freeze()
