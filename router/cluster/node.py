"""One relay process of the Redis Streams mode: intake, workers or both (``--role``).

Same HTTP intake, validation, turns, mapping and sender as the embedded relay;
what differs is where a request becomes durable (``route.lua`` instead of the
SQLite journal) and who owns which customers (the partitions this process holds
a lease on, instead of all of them).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import coredis
import httpx
import structlog
import trio
from coredis.exceptions import RedisError

from ..admin import Admin
from ..app import make_dialect, router_error, serve_admin, serve_intake
from ..broadcast import Broadcast
from ..config import Config, parse_listen, redact_url
from ..errors import ConfigError, StartupError
from ..intake import Accepted, Overloaded
from ..mapping import EventPolicy, Limits
from ..metrics import Metrics
from ..segment import Item
from ..sender import TokenBucket
from ..server import serve as serve_http
from ..spool import Spool
from ..transport import infinario_transport
from .intake import ClusterIntake
from .keys import Keys
from .worker import ProjectWorker, WorkerSettings, active_customers, session_timers

log = structlog.get_logger("router.cluster")

CONNECT_TIMEOUT = 5.0


class ClusterRouter:
    """A running process of the Redis mode; the HTTP intake's pipeline."""

    def __init__(self, config: Config, client: coredis.Redis[bytes], metrics: Metrics) -> None:
        self.config = config
        self.client = client
        self.metrics = metrics
        self.url: str | None = None
        self.admin_url: str | None = None
        self.running = False
        self.progress = Broadcast()
        self.intake = ClusterIntake(client, write_keys=dict(config.write_keys),
                                    partitions=config.partitions,
                                    dedup_window=config.dedup_window, metrics=metrics)
        self.workers: list[ProjectWorker] = []
        self._offset = time.time() - trio.current_time()
        self._stop = trio.Event()

    def wall(self) -> float:
        return self._offset + trio.current_time()

    def project_for(self, write_key: str) -> str | None:
        return self.config.write_keys.get(write_key)

    @property
    def accepting(self) -> bool:
        return self.running

    async def accept(
        self, write_key: str, messages: Sequence[dict[str, Any]], items: Sequence[Item],
        shared: bytes | None = None, contexts: Sequence[int | None] | None = None,
    ) -> Accepted:
        if not messages:
            return Accepted(0, 0)
        if not self.running:
            raise Overloaded("the router is not running")
        return await self.intake.accept(write_key, messages, items, shared, self.wall())

    def report(self) -> dict[str, Any]:
        return {"projects": {w.keys.project: w.schema.report() for w in self.workers},
                "partitions": {w.keys.project: sorted(w.tasks) for w in self.workers}}

    def health(self) -> dict[str, Any]:
        status = "ok" if self.running else "draining"
        if status == "ok" and self.intake.unavailable is not None:
            status = "storage_unavailable"
        return {"status": status, "role": self.config.role,
                "redis": redact_url(self.config.redis or ""),
                "partitions_held": sum(len(w.tasks) for w in self.workers),
                "outbox_in_memory": sum(w.pending() for w in self.workers)}

    def readiness(self) -> str | None:
        if not self.running:
            return "the relay is draining"
        if self.intake.unavailable is not None:
            return f"redis is unavailable: {self.intake.unavailable}"
        return None

    def stop(self) -> None:
        self._stop.set()

    async def wait_closed(self) -> None:
        await self._stop.wait()


async def _connect(config: Config, client: coredis.Redis[bytes]) -> None:
    """Fail at start, in one line, when Redis cannot be used."""
    shown = redact_url(config.redis or "")
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await client.ping()
            settings = await client.config_get(["appendfsync"])
    except (RedisError, OSError, trio.TooSlowError) as exc:
        raise StartupError(f"redis: cannot reach {shown}: {exc or type(exc).__name__}") \
            from None
    fsync = settings.get(b"appendfsync", settings.get("appendfsync"))  # type: ignore[call-overload]
    if fsync not in (b"always", "always"):
        log.warning("redis does not fsync every write: a crash of its host can lose "
                    "acknowledged messages; set appendonly yes and appendfsync always",
                    appendfsync=fsync)
    for project in set(config.write_keys.values()):
        keys = Keys(project, config.partitions)
        try:
            await client.hsetnx(keys.meta, "partitions", str(config.partitions))
            stored = await client.hget(keys.meta, "partitions")
        except (RedisError, OSError) as exc:
            raise StartupError(f"redis: cannot reach {shown}: {exc}") from None
        if stored is not None and int(stored) != config.partitions:
            raise ConfigError(f"partitions: project data in Redis has {int(stored)} "
                              f"partitions; start with --partitions {int(stored)}")


@asynccontextmanager
async def open_cluster(
    config: Config, *, http: bool = False, transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[ClusterRouter]:
    """The Redis mode's ``open_router``: this process's roles for the ``async with`` block."""
    if not config.write_keys:
        raise ConfigError("write-key: none configured; add --write-key KEY=PROJECT_TOKEN")
    assert config.redis is not None
    client: coredis.Redis[bytes] = coredis.Redis.from_url(config.redis, decode_responses=False)
    if transport is None:
        transport = infinario_transport(config.infinario_url,
                                        max_connections=config.concurrency)
    metrics = Metrics()
    try:
        async with client:
            await _connect(config, client)
            router = ClusterRouter(config, client, metrics)
            async with trio.open_nursery() as nursery:
                if config.role in ("all", "worker"):
                    await _start_workers(nursery, router, transport)
                _gauges(router)
                if config.admin_listen is not None:
                    router.admin_url = await serve_admin(nursery, router, config.admin_listen)
                if http and config.role in ("all", "intake"):
                    router.url = await serve_intake(nursery, router, config)
                elif http and config.admin_listen is None:
                    # A worker takes no Segment requests, but its operator endpoints
                    # (/health, /ready, /metrics, /report) are on --listen.
                    host, port = parse_listen(config.listen)
                    router.url = await nursery.start(serve_http, Admin(router), host, port)
                router.running = True
                log.info("router started", mode="redis", role=config.role, url=router.url,
                         redis=redact_url(config.redis), partitions=config.partitions)
                try:
                    yield router
                finally:
                    router.running = False
                    # Partitions stop first, then their leases are released, so another
                    # worker takes them over at once instead of after the lease TTL.
                    with trio.move_on_after(config.grace):
                        async with trio.open_nursery() as leaving:
                            for worker in router.workers:
                                leaving.start_soon(worker.leave)
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The client's own tasks wrap a startup error: give it back as one line.
        first = router_error(group)
        if first is None:
            raise
        raise first from None
    finally:
        await transport.aclose()
    log.info("router stopped")


async def _start_workers(nursery: trio.Nursery, router: ClusterRouter,
                         transport: httpx.AsyncBaseTransport) -> None:
    config = router.config
    rate = config.effective_rate_limit
    settings = WorkerSettings(
        policy=EventPolicy(renames=dict(config.renames), allow_campaign=config.allow_campaign),
        limits=Limits(customer_keys=config.max_customer_keys, event_keys=config.max_event_keys,
                      event_types=config.max_event_types),
        session_timeout=config.session_timeout, dialect=make_dialect(config),
        base_url=config.infinario_url, transport=transport,
        request_timeout=config.request_timeout, retry_window=config.retry_window,
        bucket=TokenBucket(rate) if rate else None, lane_window=config.lane_window,
        linger=config.linger, active_customers=config.active_customers)
    spool = Spool(2**62)  # Redis's maxmemory is the cap in this mode
    for project in sorted(set(config.write_keys.values())):
        worker = ProjectWorker(router.client, Keys(project, config.partitions), settings,
                               router.metrics, router.wall, spool, router.progress)
        router.workers.append(worker)
        await nursery.start(worker.run)


def _gauges(router: ClusterRouter) -> None:
    m = router.metrics
    m.gauge("outbox_in_memory", "Commands held in memory by the sender",
            lambda: sum(w.pending() for w in router.workers))
    m.gauge("customers_active", "Customers in memory",
            lambda: active_customers(router.workers))
    m.gauge("session_timers", "Open sessions with a pending deadline",
            lambda: session_timers(router.workers))
    m.gauge("partitions_held", "Partitions this process holds a lease on",
            lambda: sum(len(w.tasks) for w in router.workers))
