"""Test helpers for the Redis Streams mode: bounded polling, a network partition on demand."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def until(condition: Callable[[], Any | Awaitable[Any]], step: float = 0.01) -> None:
    """Poll ``condition`` until it is true; callers bound the wait with ``fail_after``."""
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        await trio.sleep(step)


def port_of(redis_url: str) -> int:
    return int(redis_url.rsplit(":", 1)[1].split("/")[0])


class Gate:
    """Forwards every connection to ``127.0.0.1:target``; ``hold`` stops bytes in a direction.

    Held bytes are kept, not dropped: ``open`` delivers them late, like a stalled network
    or a paused process would.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.connections = 0  # accepted so far
        self._open = {"up": trio.Event(), "down": trio.Event()}  # up: client -> server
        self.open()

    def hold(self, *, up: bool = True, down: bool = True) -> None:
        for direction, held in (("up", up), ("down", down)):
            if held and self._open[direction].is_set():
                self._open[direction] = trio.Event()

    def open(self) -> None:
        for event in self._open.values():
            event.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with (client, await trio.open_tcp_stream("127.0.0.1", self.target) as server,
                    trio.open_nursery() as nursery):
            nursery.start_soon(self._pump, client, server, "up", nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, "down", nursery.cancel_scope)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, direction: str,
                    both: trio.CancelScope) -> None:
        try:
            async for data in source:
                await self._open[direction].wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()  # one side closed: close the other
