"""Admission: how many accepted messages may be on their way to their round's commit.

Intake reserves room before it journals a request and the customers stage gives
it back once the request's round has committed, so the channel between them
never holds more than ``capacity`` messages: when the stage falls behind, intake
waits briefly and then answers 503, and a refused request costs no disk.

Fairness between write keys: while a request of another write key is waiting
for room, a key that already holds half of the capacity gets no more. A flood
on one key therefore fills at most half of the pipeline whenever anyone else
wants in; alone, a key may use all of it. The stage gives room back by round,
not by key, so the room each key holds is counted oldest reservation first:
the pipeline is first in, first out, and the count is exact once it is empty.
"""

from __future__ import annotations

from collections import deque

import trio

from .broadcast import Broadcast


class Admission:
    """A weighted semaphore over messages, with a bounded wait and a per-key share."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.share = max(1, capacity // 2)
        self.used = 0
        self.held: dict[str, int] = {}  # room each write key holds
        self._grants: deque[list[object]] = deque()  # [key, count], oldest first
        self._waiting: dict[str, int] = {}  # requests waiting for room, by key
        self._room = Broadcast()

    def _fits(self, key: str, need: int) -> bool:
        if self.used + need > self.capacity:
            return False
        held = self.held.get(key, 0)
        if not held or held + need <= self.share:
            return True
        return not any(count for other, count in self._waiting.items() if other != key)

    async def acquire(self, count: int, wait: float, key: str = "") -> bool:
        """Reserve room for ``count`` messages of ``key``; False if none freed up within
        ``wait``.

        A request larger than the whole capacity waits for an empty pipeline and
        then takes it all, so any request can pass eventually.
        """
        need = min(count, self.capacity)
        if not self._fits(key, need):
            self._waiting[key] = self._waiting.get(key, 0) + 1
            try:
                with trio.move_on_after(wait):
                    while not self._fits(key, need):
                        await self._room.wait()
            finally:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
                # Another key may have been held back for this one.
                self._room.fire()
            if not self._fits(key, need):
                return False
        self.used += count
        self.held[key] = self.held.get(key, 0) + count
        self._grants.append([key, count])
        return True

    def release(self, count: int, key: str | None = None) -> None:
        """Give back ``count`` messages: the newest of ``key``'s reservation when given
        (a request that kept fewer than it reserved), else the oldest reservations."""
        assert count <= self.used, f"released {count} of {self.used} admitted messages"
        self.used -= count
        grants = self._grants
        left = count
        if key is not None:
            for grant in reversed(grants):
                if grant[0] == key and left:
                    left = self._take(grant, left)
        while grants:
            if not grants[0][1]:
                grants.popleft()
            elif left:
                left = self._take(grants[0], left)
            else:
                break
        self._room.fire()

    def _take(self, grant: list[object], wanted: int) -> int:
        key, count = grant
        assert isinstance(key, str) and isinstance(count, int)
        taken = min(count, wanted)
        grant[1] = count - taken
        held = self.held[key] - taken
        if held:
            self.held[key] = held
        else:
            del self.held[key]
        return wanted - taken
