"""Spreading connections over workers that share one listening socket.

Every worker is woken by a new connection and the kernel lets the first one to call
``accept`` win: in practice the same worker wins every race while all are idle, so a
gateway opening its pool of keep-alive connections at once would pin them all to one
worker and leave the others idle for the pool's lifetime.

The fix costs one shared page: each worker publishes its number of open connections in its
own slot (one writer per slot, so no locking), and a worker that holds more connections
than the least-loaded live sibling lets that sibling take the connection first. The
deferral is one-shot and short, so a sibling busy in a long predict() cannot starve a
connection.
"""

from __future__ import annotations

import mmap

NOT_ACCEPTING = -1
DEFER_SECONDS = 0.002


class ConnectionTable:
    """Connection counts of all worker slots, in memory shared across ``fork``."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        # Anonymous mmap is MAP_SHARED: the children see each other's writes.
        self._memory = mmap.mmap(-1, 4 * slots)
        self._counts = memoryview(self._memory).cast("i")
        for slot in range(slots):
            self._counts[slot] = NOT_ACCEPTING

    def set(self, slot: int, count: int) -> None:
        """Publishes ``slot``'s count (``NOT_ACCEPTING`` while loading, draining or dead)."""
        self._counts[slot] = count

    def get(self, slot: int) -> int:
        """The published count of ``slot``."""
        return self._counts[slot]

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The smallest count among the other accepting slots (None: no other accepts)."""
        counts = self._counts
        best: int | None = None
        for other in range(self.slots):
            if other != slot:
                count = counts[other]
                if count >= 0 and (best is None or count < best):
                    best = count
        return best
