"""The stages of a pipeline-parallel instance as a tandem of FIFO queues."""
from __future__ import annotations


class Pipeline:
    """pp stages. A micro-batch enters stage s once it has left stage s-1 and stage s is free.
    Micro-batches enter stage 0 in launch order and none overtakes another, so reserving every
    stage at launch gives the exact tandem-queue times, including stalls behind a longer batch
    ahead (a big prefill holds back the decode micro-batches behind it, stage by stage)."""

    def __init__(self, stages: int):
        self.free = [0.0] * stages

    def free_at(self) -> float:
        """When stage 0 can take the next micro-batch."""
        return self.free[0]

    def busy_until(self) -> float:
        """When the last micro-batch launched leaves the last stage (the instance is idle)."""
        return self.free[-1]

    def run(self, start: float, first: float, rest: float) -> float:
        """Launch at `start` a micro-batch that holds stage 0 for `first` seconds (its stage
        time plus the step's host overhead) and every later stage for `rest`; returns when it
        leaves the last stage."""
        free = self.free
        t = max(start, free[0]) + first
        free[0] = t
        for s in range(1, len(free)):
            t = max(t, free[s]) + rest
            free[s] = t
        return t
