"""A broadcast wake-up for trio tasks waiting on a condition that other tasks change."""

from __future__ import annotations

import trio


class Broadcast:
    """Wakes every task waiting at the moment ``fire`` is called.

    A waiter re-checks its condition after waking: ``fire`` means "something
    changed", not "your condition holds". Setting the current event before
    replacing it is what wakes every waiter, however many there are.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()
