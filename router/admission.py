"""Admission: how many accepted messages may be on their way to their round's commit.

Intake reserves room before it journals a request and the customers stage gives
it back once the request's round has committed, so the channel between them
never holds more than ``capacity`` messages: when the stage falls behind, intake
waits briefly and then answers 503, and a refused request costs no disk.
"""

from __future__ import annotations

import trio

from .broadcast import Broadcast


class Admission:
    """A weighted semaphore over messages, with a bounded wait."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._room = Broadcast()

    async def acquire(self, count: int, wait: float) -> bool:
        """Reserve room for ``count`` messages; False if none freed up within ``wait``.

        A request larger than the whole capacity waits for an empty pipeline and
        then takes it all, so any request can pass eventually.
        """
        need = min(count, self.capacity)
        if self.used + need > self.capacity:
            with trio.move_on_after(wait):
                while self.used + need > self.capacity:
                    await self._room.wait()
            if self.used + need > self.capacity:
                return False
        self.used += count
        return True

    def release(self, count: int) -> None:
        assert count <= self.used, f"released {count} of {self.used} admitted messages"
        self.used -= count
        self._room.fire()
