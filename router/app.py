"""Wiring: one nursery running the store, the directory, the sender and (optionally) HTTP.

    intake (HTTP or Router.submit)
        -> journal (SQLite, group commit) -> 200
        -> Inbox -> Directory (per-customer turns) -> outbox (same commit as the state)
        -> Sender lanes -> Infinario

``open_router`` is the embedding API; ``serve`` is what the CLI runs.
"""

from __future__ import annotations

import enum
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import msgspec
import structlog
import trio

from . import segment
from . import store as st
from .actors import Directory, Inbox, Item, Spool
from .config import Config
from .errors import ConfigError, Rejected
from .http import parse_listen, serve_asgi
from .infinario import V2, Dialect, Legacy
from .intake import Accepted, Intake, Overloaded
from .mapping import EventPolicy, Limits
from .metrics import Metrics
from .sender import Sender

log = structlog.get_logger("router")

INBOX_CAPACITY = 20_000
RESERVE_WAIT = 1.0
DEDUP_SWEEP = 60.0
_encode = msgspec.json.Encoder().encode


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


class Router:
    """A running pipeline. Submit Segment messages with ``submit``/``submit_batch``."""

    def __init__(self, config: Config, store: st.Store, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.state = State.STARTING
        self.url: str | None = None
        self.spool = Spool(config.spool_cap)
        self.inbox = Inbox(INBOX_CAPACITY)
        self.journal_seq = st.SeqCounter()
        self.outbox_seq = st.SeqCounter()
        self._offset = time.time() - trio.current_time()
        self._stop = trio.Event()
        self.directory: Directory
        self.sender: Sender

    # --- time --------------------------------------------------------------------------------

    def wall(self) -> float:
        """POSIX time that follows trio's clock, so a mock clock drives sessions in tests."""
        return self._offset + trio.current_time()

    # --- the intake's view -------------------------------------------------------------------

    def project_for(self, write_key: str) -> str | None:
        return self.config.write_keys.get(write_key)

    @property
    def accepting(self) -> bool:
        return self.state is State.RUNNING

    async def accept(
        self, write_key: str, messages: Sequence[dict[str, Any]],
        bodies: Sequence[bytes | None] | None = None,
    ) -> Accepted:
        """Journal validated messages; return once they are on disk.

        ``bodies``, when given, holds each message's JSON where the caller has it
        already (None where it has not); the others are encoded here.
        """
        if not messages:
            return Accepted(0, 0)
        if self.spool.full:
            raise Overloaded("spool is over its disk cap")
        count = len(messages)
        if not await self.inbox.reserve(count, RESERVE_WAIT):
            raise Overloaded("pipeline is full")
        given = [None] * count if bodies is None else bodies
        journal = [(m["messageId"], _encode(m) if body is None else body)
                   for m, body in zip(messages, given, strict=True)]
        try:
            seqs = await self.store.call(
                partial(_journal, write_key=write_key, bodies=journal, now=self.wall(),
                        counter=self.journal_seq)
            )
        except BaseException:
            self.inbox.release(count)
            raise
        items = []
        for seq, message, (_, body) in zip(seqs, messages, journal, strict=True):
            if seq is not None:
                items.append(Item(seq, write_key, message, body))
                self.spool.add(len(body))
        self.inbox.release(count - len(items))
        self.inbox.put(items)
        self.metrics.inc("messages_accepted_total", len(items))
        if len(items) < count:
            self.metrics.inc("messages_duplicate_total", count - len(items))
        return Accepted(len(items), count - len(items))

    async def submit(self, message: dict[str, Any], *, write_key: str) -> Accepted:
        """Validate and journal one Segment message (``type`` inside it).

        Returns once the message is on disk. Raises ``Rejected`` for an invalid
        message or unknown write key and ``Overloaded`` when the pipeline is full.
        """
        result = await self.submit_batch([message], write_key=write_key)
        if result.rejected:
            reject = result.rejected[0]
            raise Rejected(reject["code"], reject["message"])
        return result

    async def submit_batch(
        self, messages: Sequence[dict[str, Any]], *, write_key: str
    ) -> Accepted:
        """Like a ``/v1/batch`` request: invalid messages are rejected alone, listed
        in the result by index; the others are journaled."""
        if self.project_for(write_key) is None:
            raise Rejected("invalid_write_key", "unknown write key", status=401)
        if not self.accepting:
            raise Overloaded("the router is not running")
        now = self.wall()
        valid: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for index, original in enumerate(messages):
            try:
                # The same checks as HTTP: an item's size and depth, then its fields.
                message = segment.decode_item(_encode(original))
                valid.append(segment.validate(message, type_=None, received_at=now))
            except Rejected as exc:
                rejected.append({"index": index, "code": exc.code, "message": exc.message})
                self.metrics.inc("messages_rejected_total", reason=exc.code)
            except (TypeError, msgspec.EncodeError) as exc:
                rejected.append({"index": index, "code": "invalid_message",
                                 "message": f"message is not JSON-serializable: {exc}"})
                self.metrics.inc("messages_rejected_total", reason="invalid_message")
        result = await self.accept(write_key, valid)
        result.rejected = rejected
        return result

    def report(self) -> dict[str, Any]:
        return {
            "projects": {project: schema.report()
                         for project, schema in self.directory.schemas.items()},
        }

    def health(self) -> dict[str, Any]:
        status = "ok" if self.state is State.RUNNING else self.state.value
        return {"status": status, "spool_bytes": self.spool.bytes,
                "inbox": len(self.inbox), "outbox_in_memory": self.sender.pending}

    # --- lifecycle ---------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until everything accepted so far has been answered by Infinario."""
        directory = self.directory
        while (self.inbox.used or len(self.inbox) or directory.processing
               or directory.rounds_in_flight):
            await directory.idle.wait()
        await self.sender.wait_idle()

    async def wait_closed(self) -> None:
        await self._stop.wait()

    def stop(self) -> None:
        """Begin a graceful stop: refuse new work (503), then drain for the grace period."""
        if self.state is State.RUNNING:
            self.state = State.DRAINING
        self._stop.set()


def _journal(
    conn: Any, *, write_key: str, bodies: list[tuple[str, bytes]], now: float,
    counter: st.SeqCounter,
) -> list[int | None]:
    seqs = st.journal_accept(conn, write_key, bodies, now, counter.next)
    taken = [s for s in seqs if s is not None]
    if taken:
        counter.next = taken[-1] + 1
    return seqs


def infinario_transport(config: Config) -> httpx.AsyncBaseTransport:
    """A pooled HTTP transport to Infinario, one connection per lane.

    Honours the standard proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``, ``NO_PROXY``) for the Infinario host, as an HTTP client would.
    """
    limits = httpx.Limits(max_connections=config.concurrency,
                          max_keepalive_connections=config.concurrency)
    url = urllib.parse.urlsplit(config.infinario_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and url.hostname and urllib.request.proxy_bypass(url.hostname):
        proxy = None
    return httpx.AsyncHTTPTransport(limits=limits, proxy=proxy or None)


def make_dialect(config: Config) -> Dialect:
    if config.api == "v2":
        projects = set(config.write_keys.values()) | set(config.project_auth)
        return V2({project: config.auth_header(project) for project in projects})
    return Legacy()


@asynccontextmanager
async def open_router(
    config: Config,
    *,
    http: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Router]:
    """Start the pipeline in a nursery of its own for the ``async with`` block.

    With ``http=True`` the Segment HTTP intake listens on ``config.listen`` (port 0
    picks a free one; ``router.url`` says which). On exit the router stops taking
    work, drains for ``config.grace`` seconds and persists; undelivered commands
    stay in the outbox for the next start.
    """
    if not config.write_keys:
        raise ConfigError("write-key: none configured; add --write-key KEY=PROJECT_TOKEN")
    data_dir = st.DataDir(config.data_dir)
    data_dir.prepare()
    data_dir.lock()
    try:
        conn = st.open_database(config.data_dir / st.DB_NAME)
    except BaseException:
        data_dir.unlock()
        raise
    store = st.Store(conn)
    metrics = Metrics()
    router = Router(config, store, metrics)
    limits = Limits(customer_keys=config.max_customer_keys, event_keys=config.max_event_keys,
                    event_types=config.max_event_types)
    policy = EventPolicy(renames=dict(config.renames), allow_campaign=config.allow_campaign)
    if transport is None:
        transport = infinario_transport(config)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            journal_max, outbox_max, spooled = await store.call(
                lambda c: (st.max_seq(c, "journal"), st.max_seq(c, "outbox"), st.spool_bytes(c))
            )
            router.journal_seq.next = journal_max + 1
            router.outbox_seq.next = outbox_max + 1
            router.spool.add(spooled)
            router.sender = Sender(
                store=store, dialect=make_dialect(config), base_url=config.infinario_url,
                lanes=config.concurrency, transport=transport,
                timeout=config.request_timeout, retry_window=config.retry_window,
                rate_limit=config.effective_rate_limit, metrics=metrics, spool=router.spool,
                wall=router.wall, window=config.lane_window, linger=config.linger,
            )
            router.directory = Directory(
                store=store, write_keys=dict(config.write_keys), policy=policy, limits=limits,
                session_timeout=config.session_timeout, lanes=config.concurrency,
                active_customers=config.active_customers, metrics=metrics,
                deliver=router.sender.deliver, spool=router.spool, outbox_seq=router.outbox_seq,
                wall=router.wall,
            )
            await nursery.start(router.directory.run, router.inbox)
            await nursery.start(router.sender.run)
            nursery.start_soon(router.sender.watch_replays, router.outbox_seq)
            nursery.start_soon(_sweep_dedup, router)
            _gauges(router)
            if http:
                host, port = parse_listen(config.listen)
                router.url = await nursery.start(
                    partial(serve_asgi, Intake(router), host, port,
                            shutdown_trigger=router._stop.wait, grace=config.grace)
                )
            router.state = State.RUNNING
            log.info("router started", url=router.url, api=config.api,
                     infinario=config.infinario_url, data_dir=str(config.data_dir),
                     recovered_spool_bytes=spooled)
            try:
                yield router
            finally:
                router.stop()
                with trio.move_on_after(config.grace) as scope:
                    await router.drain()
                if scope.cancelled_caught:
                    log.warning("grace period over; undelivered commands stay in the outbox",
                                outbox_in_memory=router.sender.pending)
                nursery.cancel_scope.cancel()
    finally:
        router.state = State.CLOSED
        await transport.aclose()
        store.close()
        data_dir.unlock()
        log.info("router stopped")


def _gauges(router: Router) -> None:
    m = router.metrics
    m.gauge("spool_bytes", "Bytes of journal and outbox not yet finished",
            lambda: router.spool.bytes)
    m.gauge("inbox_messages", "Journaled messages waiting for their customer",
            lambda: len(router.inbox))
    m.gauge("outbox_in_memory", "Commands held in memory by the sender",
            lambda: router.sender.pending)
    m.gauge("customers_active", "Customers in memory", lambda: len(router.directory.states))
    m.gauge("session_timers", "Open sessions with a pending deadline",
            lambda: len(router.directory.timers))
    m.gauge("journal_commits", "Store transactions committed", lambda: router.store.commits)


async def _sweep_dedup(router: Router) -> None:
    # A short window is swept often enough to be honoured; a long one once a minute.
    interval = min(DEDUP_SWEEP, max(0.05, router.config.dedup_window / 2))
    while True:
        await trio.sleep(interval)
        before = router.wall() - router.config.dedup_window
        await router.store.call(partial(st.dedup_expire, before=before))


async def serve(config: Config, *, task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Run the relay with its HTTP intake until SIGTERM/SIGINT, then stop gracefully."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_router(config, http=True) as router:
            task_status.started(router)
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    async for signum in signals:
                        log.info("signal received; draining", signal=signal.Signals(signum).name)
                        router.stop()
                        return

                nursery.start_soon(watch)
                await router.wait_closed()
                nursery.cancel_scope.cancel()
