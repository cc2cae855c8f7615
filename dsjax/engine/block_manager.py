"""Host-side bookkeeping of KV pages: which pages each request holds, on device or swapped out.

Pure Python (no JAX) so schedulers built on it are unit-testable. Page ids index axis 1 of the
device cache (models/attention.py); the engine moves the data, this module only counts.
"""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """Raised when an allocation is asked for more free blocks than exist; schedulers check first."""


class BlockAllocator:
    """A free list of block ids 0..num_blocks-1. Freed blocks are reused first (cache-warm)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Per-instance block tables: device blocks for resident requests, host blocks for swapped ones.

    Sequences forked from one prompt (n, best_of) share the prompt's full blocks; `shared`
    counts the extra holders of such a block, which is freed when its last holder lets go."""

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0):
        self.block_size = block_size
        self.device = BlockAllocator(num_blocks)
        self.host = BlockAllocator(num_host_blocks) if num_host_blocks > 0 else None
        self.tables: dict[str, list[int]] = {}
        self.host_tables: dict[str, list[int]] = {}
        self.shared: dict[int, int] = {}   # device block -> holders beyond the first

    @property
    def num_total(self) -> int:
        return self.device.num_blocks

    @property
    def num_free(self) -> int:
        return self.device.num_free

    @property
    def num_used(self) -> int:
        return self.device.num_used

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def holds(self, request_id: str) -> bool:
        return request_id in self.tables or request_id in self.host_tables

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.device.num_free

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        if request_id in self.tables:
            raise ValueError(f"request {request_id} already holds blocks")
        table = self.device.allocate(self.blocks_needed(num_tokens))
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

    def _release_device(self, blocks: list[int]) -> None:
        for b in blocks:
            extra = self.shared.get(b, 0)
            if extra > 1:
                self.shared[b] = extra - 1
            elif extra == 1:
                del self.shared[b]
            else:
                self.device.free([b])

    def free(self, request_id: str) -> list[int]:
        """Release everything the request holds (device and host); returns its device blocks."""
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
        for child in child_ids:
            self.tables[child] = list(table)
        for b in table:
            self.shared[b] = self.shared.get(b, 0) + len(child_ids) - 1
            if not self.shared[b]:
                del self.shared[b]

    def _write_block(self, request_id: str, num_tokens: int) -> int | None:
        """Index in the table of the block that the token at num_tokens-1 is written to, if
        that block is shared (it must be copied before the write), else None."""
        table = self.tables[request_id]
        at = (num_tokens - 1) // self.block_size
        return at if at < len(table) and table[at] in self.shared else None

    def extra_blocks_for(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that `num_tokens` tokens fit and the newest one has a block of its
        own to be written to."""
        grow = max(0, self.blocks_needed(num_tokens) - len(self.tables[request_id]))
        return grow + (self._write_block(request_id, num_tokens) is not None)

    def prepare_write(self, request_id: str, num_tokens: int) -> tuple[bool, tuple | None]:
        """Make room for num_tokens and give the request its own copy of the block its newest
        token goes to (copy on write). All or nothing: (False, None) if blocks run out, else
        (True, (source block, new block) to copy, or None)."""
        table = self.tables[request_id]
        if num_tokens <= len(table) * self.block_size and not self.shared:
            return True, None   # the common decode step: room already, nothing shared
        if self.extra_blocks_for(request_id, num_tokens) > self.device.num_free:
            return False, None
        self.grow(request_id, num_tokens)
        at = self._write_block(request_id, num_tokens)
        if at is None:
            return True, None
        table = self.tables[request_id]
        old, (new,) = table[at], self.device.allocate(1)
        self._release_device([old])
        table[at] = new
        return True, (old, new)

    def can_swap_out(self, request_id: str) -> bool:
        return self.host is not None and len(self.tables[request_id]) <= self.host.num_free

    def swap_out(self, request_id: str) -> tuple[list[int], list[int]]:
        """Move the request's table to host blocks; returns (device_blocks, host_blocks).
        Blocks it shares stay on the device for their other holders."""
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
