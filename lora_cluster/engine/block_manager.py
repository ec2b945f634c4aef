"""KV-cache blocks: a free list and one block table per sequence (host-side, no torch).

Every rank reserves the same ``num_blocks`` blocks of ``block_size`` token slots up front;
this class decides which block ids a sequence owns. Token ``i`` of a sequence lives at
``table[i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

from collections import deque


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out KV blocks; a sequence's table only grows until the sequence is freed."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def table(self, seq_id: int) -> list[int]:
        """The sequence's block ids (empty when it holds none). Do not mutate."""
        return self._tables.get(seq_id, [])

    def extra_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks the sequence still needs to hold ``num_tokens`` tokens in total."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, blocks_for(num_tokens, self.block_size) - have)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.extra_blocks(seq_id, num_tokens) <= len(self._free)

    def grow(self, seq_id: int, num_tokens: int) -> list[int]:
        """Make the sequence hold ``num_tokens`` tokens; returns the blocks added (maybe none).

        The caller checks ``can_grow`` first: running out here is a scheduler bug.
        """
        need = self.extra_blocks(seq_id, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"sequence {seq_id}: needs {need} blocks, {len(self._free)} free")
        added = [self._free.popleft() for _ in range(need)]
        self._tables.setdefault(seq_id, []).extend(added)
        return added

    def free(self, seq_id: int) -> int:
        """Return all of a sequence's blocks to the free list; returns how many."""
        table = self._tables.pop(seq_id, [])
        # Freed blocks go to the front: recently written blocks are warm in caches.
        self._free.extendleft(reversed(table))
        return len(table)
