"""Shared pieces for end-to-end tests: the relay and the simulator on loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from segment.analytics.client import Client

from router import Config, Router, open_router
from router.simulator import Simulator, run_simulator

WRITE_KEY = "e2e-key"
PROJECT = "e2e-project"


@dataclass
class Stack:
    router: Router
    sim: Simulator
    sim_url: str

    @property
    def url(self) -> str:
        assert self.router.url is not None
        return self.router.url

    def client(self, **options: Any) -> Client:
        """A real Segment client pointed at the relay, sending synchronously."""
        errors: list[Any] = []
        client = Client(WRITE_KEY, host=self.url, sync_mode=True, max_retries=2,
                        on_error=lambda error, batch: errors.append(error), **options)
        client.errors = errors  # type: ignore[attr-defined]
        return client

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Client calls block, so they run in a thread while trio keeps serving."""
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def settle(self) -> None:
        with trio.fail_after(30):
            await self.router.drain()


@asynccontextmanager
async def open_stack(
    data_dir: Path, *, api: str = "legacy", sim: Simulator | None = None, **overrides: Any
) -> AsyncIterator[Stack]:
    sim = sim or Simulator()
    async with trio.open_nursery() as nursery:
        sim_url = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
        config = Config(
            listen="127.0.0.1:0", infinario_url=sim_url, api=api,  # type: ignore[arg-type]
            write_keys={WRITE_KEY: PROJECT}, data_dir=data_dir, grace=2.0, **overrides,
        )
        async with open_router(config, http=True) as router:
            yield Stack(router, sim, sim_url)
        nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], Any], *, within: float = 30.0,
                     interval: float = 0.1) -> None:
    """Poll ``predicate`` (sync or async) until it is true; fail after ``within`` seconds.

    What is polled lives in another process or behind a socket, so there is no
    event to wait on.
    """
    for _ in range(int(within / interval) + 1):
        result = predicate()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return
        await trio.sleep(interval)
    raise AssertionError(f"condition not met within {within} s")
