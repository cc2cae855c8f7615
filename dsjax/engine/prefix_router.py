"""The router's estimate of which prompt blocks each prefill instance's prefix cache holds, to
send a prompt where its prefix was computed (SGLang's cache-aware routing, simplified).

The router cannot see an instance's cache, so it remembers the block hashes of the prompts it
sent there (dsjax.engine.block_manager.block_hashes: the same keys the instance uses), least
recently used first, bounded by the instance's pages; an instance that dies is forgotten with
its index. A wrong guess costs only a recompute: the instance looks its cache up itself.
"""
from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    def __init__(self, capacity_blocks: int):
        self.capacity = max(1, capacity_blocks)
        self._lru: OrderedDict[bytes, None] = OrderedDict()

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks of this hash chain the instance is believed to hold."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def add(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)


def pick_by_prefix(candidates, prompt_len: int, matched: dict, block_size: int):
    """The instance with the least prompt work queued once its cached prefix is discounted:
    outstanding tokens + this prompt's tokens it would compute (ties: less outstanding)."""
    return min(candidates, key=lambda i: (i.outstanding + prompt_len - matched[i.name] *
                                          block_size, i.outstanding))
