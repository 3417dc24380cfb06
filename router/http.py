"""Serving ASGI apps on hypercorn's trio worker (the intake, until it moves to router.server)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

ASGIApp = Callable[..., Awaitable[None]]


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8080`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def hypercorn_config(host: str, port: int, *, grace: float = 5.0) -> HypercornConfig:
    config = HypercornConfig()
    bind_host = f"[{host}]" if ":" in host else host
    config.bind = [f"{bind_host}:{port}"]
    config.graceful_timeout = grace
    # Segment clients keep connections open between flushes; hypercorn's default
    # 5 s keep-alive would make them reconnect for nearly every batch.
    config.keep_alive_timeout = 75
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    grace: float = 5.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled or ``shutdown_trigger`` returns.

    ``task_status.started`` receives the base URL actually bound, so callers can
    listen on port 0 and learn the port.
    """
    config = hypercorn_config(host, port, grace=grace)

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        task_status.started(binds[0])
