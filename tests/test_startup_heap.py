"""An engine keeps its start-up objects out of Python's cyclic collector while it serves, and
hands them back when the last engine stops (dsjax.engine.startup_heap)."""
from __future__ import annotations

import gc
import weakref

from dsjax.engine import startup_heap
from tests._engine_helpers import get_engine


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


class _Node:
    pass


def test_a_release_frees_what_its_holder_left_and_the_last_restores_the_collector():
    holders, thresholds = startup_heap._holders, startup_heap._thresholds
    startup_heap._holders, startup_heap._thresholds = 0, None
    own = gc.get_threshold()
    try:
        cycle = _Node()
        cycle.me = cycle
        alive = weakref.ref(cycle)
        startup_heap.freeze_startup_heap()   # two engines hold the heap
        startup_heap.freeze_startup_heap()
        assert gc.get_threshold()[0] >= startup_heap.YOUNG_THRESHOLD
        kept = _Node()
        kept.me = kept
        del cycle   # garbage now, but frozen
        gc.collect()
        assert alive() is not None, "a frozen cycle must not be collected"
        startup_heap.release_startup_heap()   # one engine stops
        assert alive() is None, "a release collects what was frozen"
        assert kept.me is kept and gc.get_freeze_count() > 0, "the rest is frozen again"
        assert id(kept) not in _tracked_ids()
        startup_heap.release_startup_heap()   # the last one
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == own, "the process's own thresholds are back"
    finally:
        startup_heap._holders, startup_heap._thresholds = holders, thresholds
        if holders:   # the engines still running keep theirs
            gc.freeze()
            gc.set_threshold(max(startup_heap.YOUNG_THRESHOLD, own[0]), *own[1:])
