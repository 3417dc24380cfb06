"""Shared fixtures: a real relay with its HTTP intake and a recording fake Infinario."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router import Accepted, Config, Router, open_router
from router import store as st

from .redisserver import RedisServer
from .redisserver import available as redis_available
from .redisserver import required as redis_required

WRITE_KEY = "wk"


def run_cli(*args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``infinario-router`` command, with no ``ROUTER_*`` settings but ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True,
                          text=True, timeout=60, env=full_env, cwd=cwd)
PROJECT = "proj"


@dataclass
class FakeInfinario:
    """Answers the legacy ``/bulk`` request with ``ok`` for every command and records them."""

    commands: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if request.url.path != "/bulk":
            return httpx.Response(404, json={"error": f"no endpoint {request.url.path}"})
        commands = json.loads(request.content)["commands"]
        self.commands.extend(commands)
        return httpx.Response(
            200, json={"success": True, "results": [{"status": "ok"} for _ in commands]}
        )


@dataclass
class Relay:
    """A running relay, an HTTP client pointed at it and what reached Infinario."""

    router: Router
    client: httpx.AsyncClient
    infinario: FakeInfinario
    # Every list of validated messages the intake handed to the pipeline.
    accepted: list[list[dict[str, Any]]]
    # The journal bytes the intake gave with each message, and each request's shared part.
    given_items: list[list[bytes]]
    given_shared: list[bytes | None]

    @property
    def url(self) -> str:
        assert self.router.url is not None
        return self.router.url

    async def delivered(self) -> list[dict[str, Any]]:
        """Wait until everything accepted so far reached Infinario; return all commands."""
        with trio.fail_after(10):
            await self.router.drain()
        return self.infinario.commands

    async def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """Delivered ``crm/events`` data (of one type, when given)."""
        return [c["data"] for c in await self.delivered()
                if c["name"] == "crm/events"
                and (event_type is None or c["data"]["type"] == event_type)]

    async def customers(self) -> list[dict[str, Any]]:
        """Delivered ``crm/customers`` data."""
        return [c["data"] for c in await self.delivered() if c["name"] == "crm/customers"]

    @property
    def journaled(self) -> list[dict[str, Any]]:
        """Every message the intake accepted, in order, as handed to the pipeline."""
        return [m for batch in self.accepted for m in batch]


def relay_config(tmp_path: Path, **overrides: Any) -> Config:
    options: dict[str, Any] = {
        "write_keys": {WRITE_KEY: PROJECT},
        "data_dir": tmp_path,
        "listen": "127.0.0.1:0",
        "infinario_url": "http://infinario.test",
        "grace": 5.0,
    }
    options.update(overrides)
    return Config(**options)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[st.Store]:
    """The store's writer on a fresh database, running in the test's nursery."""
    writer = st.Store(st.open_database(tmp_path / st.DB_NAME))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        yield writer
        nursery.cancel_scope.cancel()
    writer.close()


@pytest.fixture
def relay_options() -> dict[str, Any]:
    """Override in a test module or class to change the relay's configuration."""
    return {}


@pytest.fixture
async def relay(tmp_path: Path, relay_options: dict[str, Any]) -> AsyncIterator[Relay]:
    infinario = FakeInfinario()
    config = relay_config(tmp_path / "data", **relay_options)
    async with open_router(
        config, http=True, transport=httpx.MockTransport(infinario.handler)
    ) as router:
        accepted: list[list[dict[str, Any]]] = []
        items: list[list[bytes]] = []
        shared_parts: list[bytes | None] = []
        accept = router.accept

        async def spy(write_key: str, messages: Sequence[dict[str, Any]],
                      given: Sequence[bytes], shared: bytes | None = None,
                      contexts: Sequence[int | None] | None = None) -> Accepted:
            result = await accept(write_key, messages, given, shared, contexts)
            accepted.append([dict(m) for m in messages])
            items.append(list(given))
            shared_parts.append(shared)
            return result

        router.accept = spy  # type: ignore[method-assign]
        assert router.url is not None
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:
            yield Relay(router, client, infinario, accepted, items, shared_parts)


# --- Redis -------------------------------------------------------------------------------------

_redis_skipped: list[str] = []


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests get a flushed database from ``redis_url``."""
    if not redis_available():
        if redis_required():
            pytest.fail("redis-server is not on PATH; .ci/run installs Debian's redis-server")
        _redis_skipped.append("redis-server")
        pytest.skip("redis-server is not on PATH: the Redis tests did NOT run")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    assert redis_server.cli("FLUSHALL") == "OK"
    return redis_server.url


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _redis_skipped:
        terminalreporter.write_sep(
            "!", "Redis tests SKIPPED: install redis-server (Debian package) to run them",
            red=True, bold=True)
