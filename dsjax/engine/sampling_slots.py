"""Which sequence holds which row of the sampler's slot table (pure Python, no JAX).

The table itself lives on the device (dsjax.executor.sampling.SlotTable): per-sequence token
counts, penalties, logit bias and min_tokens bans, so a penalised row costs no history on the
host and no program shape. A worker assigns a row when a sequence that needs one is about to
run, fills it from the sequence's host-side tokens, and frees it when the sequence leaves.
When every row is taken, the least recently used holder that is not running now gives its row
up; it is filled again from its tokens when it next runs.
"""
from __future__ import annotations

from collections import OrderedDict


class SlotAssignments:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._holders: OrderedDict[str, int] = OrderedDict()   # least recently used first
        # Rows taken from a holder so far: a worker that carries rows between steps (the
        # persistent decode batch) rebuilds them after one, since a carried row may be it.
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._holders)

    def lookup(self, sequence_id: str) -> int | None:
        """The sequence's row, marked as just used; None if it holds none."""
        slot = self._holders.get(sequence_id)
        if slot is not None:
            self._holders.move_to_end(sequence_id)
        return slot

    def assign(self, sequence_id: str, busy) -> int:
        """A row for a sequence that holds none; `busy`: ids whose rows may not be taken (the
        sequences of this step and of the step still on the device)."""
        if sequence_id in self._holders:
            raise ValueError(f"{sequence_id} already holds sampling slot "
                             f"{self._holders[sequence_id]}")
        if not self._free:
            victim = next((s for s in self._holders if s not in busy), None)
            if victim is None:
                raise RuntimeError(f"all {self.capacity} sampling slots are held by running "
                                   f"sequences: a step may not sample more rows than that")
            self._free.append(self._holders.pop(victim))
            self.evictions += 1
        slot = self._free.pop()
        self._holders[sequence_id] = slot
        return slot

    def release(self, sequence_id: str) -> None:
        slot = self._holders.pop(sequence_id, None)
        if slot is not None:
            self._free.append(slot)
