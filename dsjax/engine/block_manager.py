"""Host-side bookkeeping of KV pages: which pages each request holds, on device or swapped out,
and which full pages hold a known prefix (automatic prefix caching).

Pure Python (no JAX) so schedulers built on it are unit-testable. Page ids index axis 1 of the
device cache (models/attention.py); the engine moves the data, this module only counts.

Pages are reference-counted: sequences forked from one prompt (n, best_of) share its pages, and
requests with a common prefix share the cached pages of that prefix. A full page is known by
a hash chain over its tokens (`block_hashes`): its parent page's hash, its token ids and the
request's cache salt, with a stable hash so every process and host agrees. A page nobody holds
stays cached until its room is needed; the least recently freed goes first, and a sequence's
pages are freed tail first, so its head (the part others share) is evicted last.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence


class OutOfBlocks(RuntimeError):
    """Raised when an allocation is asked for more free blocks than exist; schedulers check first."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None,
                 limit: int | None = None) -> list[bytes]:
    """Hash of each full block of token_ids (of the first `limit` tokens): blake2b over the
    parent's hash, the salt and the block's ids. Stable across processes (no PYTHONHASHSEED)."""
    n = len(token_ids) if limit is None else min(limit, len(token_ids))
    parent = hashlib.blake2b((salt or "").encode(), digest_size=16).digest()
    out = []
    for start in range(0, n - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[start:start + block_size]).tobytes())
        parent = h.digest()
        out.append(parent)
    return out


class BlockAllocator:
    """Block ids 0..num_blocks-1 with reference counts. Freed blocks are reused first
    (cache-warm); a freed block with a cached hash waits in `evictable` until its room is
    needed or a request hits it again."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self.refs: dict[int, int] = {}                       # held blocks -> holders
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached, held by nobody
        self.on_evict = lambda block: None                   # forget the block's hash

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and cached ones nobody holds."""
        return len(self._free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return len(self.refs)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} free of {self.num_blocks}")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self.evictable.popitem(last=False)   # least recently freed
                self.on_evict(block)
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def hold(self, block: int) -> None:
        """One more holder of a block (held already, or cached and waiting)."""
        if block in self.refs:
            self.refs[block] += 1
        elif block in self.evictable:
            del self.evictable[block]
            self.refs[block] = 1
        else:
            raise ValueError(f"block {block} is neither held nor cached")

    def free(self, blocks: list[int], cached=lambda block: False) -> None:
        """Let go of blocks; one whose last holder left waits in `evictable` if cached(block),
        else becomes free."""
        for b in blocks:
            holders = self.refs.get(b)
            if holders is None:
                raise ValueError(f"block {b} freed twice or never allocated")
            if holders > 1:
                self.refs[b] = holders - 1
                continue
            del self.refs[b]
            if cached(b):
                self.evictable[b] = None
            else:
                self._free.append(b)


class BlockManager:
    """Per-instance block tables: device blocks for resident requests, host blocks for swapped
    ones, and the prefix cache over device blocks (on unless enable_prefix_caching=False)."""

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0,
                 enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.device = BlockAllocator(num_blocks)
        self.host = BlockAllocator(num_host_blocks) if num_host_blocks > 0 else None
        self.tables: dict[str, list[int]] = {}
        self.host_tables: dict[str, list[int]] = {}
        self.caching = enable_prefix_caching
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.device.on_evict = self._forget_hash
        # Prefix cache counters (tokens), as vLLM's metrics count them.
        self.queries = 0
        self.hits = 0

    @property
    def num_total(self) -> int:
        return self.device.num_blocks

    @property
    def num_free(self) -> int:
        return self.device.num_free

    @property
    def num_used(self) -> int:
        return self.device.num_used

    @property
    def num_cached(self) -> int:
        """Blocks whose prefix is known (held or waiting)."""
        return len(self._hash_of)

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def holds(self, request_id: str) -> bool:
        return request_id in self.tables or request_id in self.host_tables

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.device.num_free

    # ---- the prefix cache -------------------------------------------------------------------

    def _forget_hash(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None and self._by_hash.get(h) == block:
            del self._by_hash[h]

    def cached_prefix(self, token_ids: Sequence[int], salt: str | None = None,
                      limit: int | None = None) -> list[int]:
        """Blocks holding the longest cached prefix of token_ids' full blocks (of the first
        `limit` tokens). Nothing is held: allocate_cached takes them."""
        if not self.caching:
            return []
        found = []
        for h in block_hashes(token_ids, self.block_size, salt, limit):
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def cost(self, hits: Sequence[int], num_tokens: int) -> int:
        """Free blocks a table of num_tokens that starts with the cached `hits` takes: its new
        blocks, and the hits nobody holds now (holding them takes them out of the free pool)."""
        waiting = sum(1 for b in hits if b in self.device.evictable)
        return max(0, self.blocks_needed(num_tokens) - len(hits)) + waiting

    def count_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_tokens
        self.hits += num_hit_tokens

    def register(self, request_id: str, token_ids: Sequence[int], salt: str | None = None,
                 num_tokens: int | None = None) -> None:
        """The request's full blocks (of its first num_tokens tokens) now hold token_ids' KV:
        known by their hashes from now on (a block already known under another id stays)."""
        if not self.caching:
            return
        table = self.tables.get(request_id, [])
        for block, h in zip(table, block_hashes(token_ids, self.block_size, salt, num_tokens)):
            if h in self._by_hash or block in self._hash_of:
                continue
            self._by_hash[h] = block
            self._hash_of[block] = h

    def _release_device(self, blocks: list[int]) -> None:
        # Tail first: a sequence's last blocks are the least likely to be shared.
        self.device.free(list(reversed(blocks)), cached=self._hash_of.__contains__)

    # ---- tables -----------------------------------------------------------------------------

    def allocate(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> list[int]:
        """A table for num_tokens tokens: the given cached prefix blocks (now held), then new
        blocks."""
        if request_id in self.tables:
            raise ValueError(f"request {request_id} already holds blocks")
        for block in cached:
            self.device.hold(block)
        try:
            fresh = self.device.allocate(max(0, self.blocks_needed(num_tokens) - len(cached)))
        except OutOfBlocks:
            self._release_device(list(cached))
            raise
        table = list(cached) + fresh
        self.tables[request_id] = table
        return table

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Extend the table to hold num_tokens; False (and nothing allocated) if blocks run out."""
        extra = max(0, self.blocks_needed(num_tokens) - len(self.tables[request_id]))
        if extra > self.device.num_free:
            return False
        if extra:
            self.tables[request_id].extend(self.device.allocate(extra))
        return True

    def free(self, request_id: str, token_ids: Sequence[int] | None = None,
             salt: str | None = None) -> list[int]:
        """Release everything the request holds (device and host); returns its device blocks.
        With token_ids (the tokens whose KV its blocks hold), its full blocks stay cached."""
        if token_ids is not None and request_id in self.tables:
            self.register(request_id, token_ids, salt)
        table = self.tables.pop(request_id, [])
        self._release_device(table)
        host = self.host_tables.pop(request_id, None)
        if host is not None:
            self.host.free(host)
        return table

    def fork(self, parent_id: str, child_ids: list[str]) -> None:
        """Hand the parent's table to several children that share every block; a child that
        writes into a shared block gets its own copy first (prepare_write)."""
        table = self.tables.pop(parent_id)
        for i, child in enumerate(child_ids):
            self.tables[child] = list(table)
            if i:
                for b in table:
                    self.device.hold(b)

    def _shared(self, block: int) -> bool:
        return self.device.refs.get(block, 0) > 1

    def _write_block(self, request_id: str, num_tokens: int) -> int | None:
        """Index in the table of the block that the token at num_tokens-1 is written to, if
        another holder shares that block (it must be copied before the write), else None."""
        table = self.tables[request_id]
        at = (num_tokens - 1) // self.block_size
        return at if at < len(table) and self._shared(table[at]) else None

    def extra_blocks_for(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that `num_tokens` tokens fit and the newest one has a block of its
        own to be written to."""
        grow = max(0, self.blocks_needed(num_tokens) - len(self.tables[request_id]))
        return grow + (self._write_block(request_id, num_tokens) is not None)

    def prepare_write(self, request_id: str, num_tokens: int
                      ) -> tuple[bool, tuple | None, bool]:
        """Make room for num_tokens and give the request its own copy of the block its newest
        token goes to (copy on write). All or nothing: (False, None, False) if blocks run out,
        else (True, (source block, new block) to copy or None, whether the table changed)."""
        table = self.tables[request_id]
        at = (num_tokens - 1) // self.block_size
        if at < len(table) and not self._shared(table[at]):
            return True, None, False   # the common decode step: room already, nothing shared
        if self.extra_blocks_for(request_id, num_tokens) > self.device.num_free:
            return False, None, False
        self.grow(request_id, num_tokens)
        at = self._write_block(request_id, num_tokens)
        if at is None:
            return True, None, True
        table = self.tables[request_id]
        old, (new,) = table[at], self.device.allocate(1)
        self._release_device([old])
        table[at] = new
        return True, (old, new), True

    def can_swap_out(self, request_id: str) -> bool:
        return self.host is not None and len(self.tables[request_id]) <= self.host.num_free

    def swap_out(self, request_id: str) -> tuple[list[int], list[int]]:
        """Move the request's table to host blocks; returns (device_blocks, host_blocks).
        Blocks it shares stay on the device for their other holders; cached ones stay cached."""
        device_blocks = self.tables.pop(request_id)
        host_blocks = self.host.allocate(len(device_blocks))
        self._release_device(device_blocks)
        self.host_tables[request_id] = host_blocks
        return device_blocks, host_blocks

    def swap_in(self, request_id: str) -> tuple[list[int], list[int]]:
        """Move a swapped request back to device blocks; returns (host_blocks, device_blocks)."""
        host_blocks = self.host_tables.pop(request_id)
        device_blocks = self.device.allocate(len(host_blocks))
        self.host.free(host_blocks)
        self.tables[request_id] = device_blocks
        return host_blocks, list(device_blocks)  # a copy: the table grows later
