"""Wiring: one nursery running the store, the customers stage, the sender and (optionally) HTTP.

    intake (HTTP or Router.submit)
        -> admission -> journal row (SQLite, group commit) -> 200
        -> memory channel -> Partition (identity, per-customer turns, session timers)
        -> outbox rows (same commit as the state) -> one memory channel per lane
        -> Sender lanes -> Infinario

``open_router`` is the embedding API; ``serve`` is what the CLI runs.
"""

from __future__ import annotations

import enum
import math
import signal
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import msgspec
import structlog
import trio

from . import journal, outbox, segment
from . import store as st
from .admin import INTAKE_ALONE, INTAKE_WITH_ADMIN, Admin, Operated
from .admission import Admission
from .broadcast import Broadcast
from .config import Config, parse_listen
from .errors import ConfigError, Rejected, RouterError, StartupError
from .infinario import V2, Dialect, Legacy
from .intake import Accepted, Intake, Overloaded, Pipeline
from .journal import Dedup, Journaled
from .mapping import EventPolicy, Limits
from .metrics import Metrics
from .partition import Partition
from .sender import Sender
from .server import ServerLimits
from .server import serve as serve_http
from .spool import Spool
from .storage import DiskUsage, StorageUnavailable
from .transport import infinario_transport

log = structlog.get_logger("router")

ADMISSION_CAPACITY = 20_000
ADMISSION_WAIT = 1.0
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
        self.admin_url: str | None = None
        self.spool = Spool(config.spool_cap)
        # The cap also holds on what the data dir really takes on disk.
        self.disk = DiskUsage(config.data_dir / st.DB_NAME, config.spool_cap,
                              lambda: store.free_bytes)
        self.admission = Admission(ADMISSION_CAPACITY)
        self.dedup = Dedup(config.dedup_window)
        self.journal_seq = st.SeqCounter()
        self.dedup_seq = st.SeqCounter()
        self.outbox_seq = st.SeqCounter()
        self.progress = Broadcast()
        self._offset = time.time() - trio.current_time()
        self._stop = trio.Event()
        self._hurry = trio.Event()
        self._accepting_now = 0  # accept() calls under way
        self._to_partition: trio.MemorySendChannel[Journaled]
        self.partition: Partition
        self.sender: Sender

    # --- time ----------------------------------------------------------------------------------

    def wall(self) -> float:
        """POSIX time that follows trio's clock, so a mock clock drives sessions in tests."""
        return self._offset + trio.current_time()

    # --- the intake's view ---------------------------------------------------------------------

    def project_for(self, write_key: str) -> str | None:
        return self.config.write_keys.get(write_key)

    @property
    def accepting(self) -> bool:
        return self.state is State.RUNNING

    async def accept(
        self, write_key: str, messages: Sequence[dict[str, Any]], items: Sequence[segment.Item],
        shared: bytes | None = None, contexts: Sequence[int | None] | None = None,
    ) -> Accepted:
        """Journal validated messages as one request; return once they are on disk.

        ``items`` holds each message's journal bytes (``segment.item_bytes``:
        without ``_time``, and without ``shared``, the part of a batch that
        applies to every item, stored once).
        """
        count = len(messages)
        if not count:
            return Accepted(0, 0)
        if not self.accepting:
            raise Overloaded("the router is not running")
        self._accepting_now += 1
        try:
            return await self._accept(write_key, messages, items, shared, contexts, count)
        finally:
            self._accepting_now -= 1
            if not self._accepting_now:
                self.progress.fire()  # a stopping relay waits for this moment

    async def _accept(
        self, write_key: str, messages: Sequence[dict[str, Any]], items: Sequence[segment.Item],
        shared: bytes | None, contexts: Sequence[int | None] | None, count: int,
    ) -> Accepted:
        if self.spool.full or self._disk_full():
            raise Overloaded("spool is over its disk cap")
        if not await self.admission.acquire(count, ADMISSION_WAIT, write_key):
            raise Overloaded("pipeline is full")
        now = self.wall()
        ids = [m["messageId"] for m in messages]
        dedup_row = self.dedup_seq.take()
        fresh = self.dedup.claim(write_key, ids, now, dedup_row)
        if all(fresh):
            kept, kept_items, kept_ids = list(messages), items, ids
        else:
            kept = [m for m, new in zip(messages, fresh, strict=True) if new]
            kept_items = [b for b, new in zip(items, fresh, strict=True) if new]
            kept_ids = [i for i, new in zip(ids, fresh, strict=True) if new]
            if contexts is not None:
                contexts = [c for c, new in zip(contexts, fresh, strict=True) if new]
        duplicates = count - len(kept)
        if duplicates:
            self.admission.release(duplicates, write_key)
            self.metrics.inc("messages_duplicate_total", duplicates)
        if not kept:
            return Accepted(0, duplicates)
        seq = self.journal_seq.take()
        body = journal.encode_row(kept_items, shared, [m[segment.TIME_KEY] for m in kept])
        try:
            await self.store.call(partial(
                journal.append, seq=seq, write_key=write_key, body=body, dedup_row=dedup_row,
                ids=journal.encode_ids(kept_ids), now=now))
        except BaseException as exc:
            self.dedup.release(write_key, kept_ids)
            self.admission.release(len(kept), write_key)
            if isinstance(exc, StorageUnavailable):
                # Nothing of the request was kept: the client keeps it and retries.
                raise Overloaded("storage is unavailable (disk full or failing)",
                                 code="storage_unavailable") from exc
            raise
        self.spool.add(len(body))
        # Admission bounds what the channel holds, so this never blocks.
        self._to_partition.send_nowait(Journaled(seq, write_key, kept, len(body), contexts))
        self.metrics.inc("messages_accepted_total", len(kept))
        return Accepted(len(kept), duplicates)

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
        items: list[bytes] = []
        rejected: list[dict[str, Any]] = []
        for index, original in enumerate(messages):
            try:
                # The same checks as HTTP: an item's size and depth, then its fields.
                message = segment.decode_item(_encode(original))
                valid.append(segment.validate(message, type_=None, received_at=now))
                items.append(segment.item_bytes(message))
            except Rejected as exc:
                rejected.append({"index": index, "code": exc.code, "message": exc.message})
                self.metrics.inc("messages_rejected_total", reason=exc.code)
            except (TypeError, msgspec.EncodeError) as exc:
                rejected.append({"index": index, "code": "invalid_message",
                                 "message": f"message is not JSON-serializable: {exc}"})
                self.metrics.inc("messages_rejected_total", reason="invalid_message")
        result = await self.accept(write_key, valid, items)
        result.rejected = rejected
        return result

    def report(self) -> dict[str, Any]:
        return {
            "projects": {project: schema.report()
                         for project, schema in self.partition.schemas.items()},
        }

    def readiness(self) -> str | None:
        """Why the relay would refuse work now (draining, saturated, cannot write), or None."""
        if self.state is not State.RUNNING:
            return f"the relay is {self.state.value}"
        if self.spool.full:
            return "spool is over its disk cap"
        if self.admission.used >= self.admission.capacity:
            return "pipeline is full"
        if self.store.write_error is not None:
            return f"cannot write to the data dir: {self.store.write_error}"
        return None

    def _disk_full(self) -> bool:
        if not self.disk.full:
            return False
        # The WAL may be most of it: ask for a checkpoint that cuts it back.
        self.store.checkpoint_wanted = True
        return True

    @property
    def writable(self) -> bool:
        """False while the last write found the disk full or failing."""
        return not self.store.failing

    def health(self) -> dict[str, Any]:
        status = "ok" if self.state is State.RUNNING else self.state.value
        if status == "ok" and not self.writable:
            status = "storage_unavailable"
        return {"status": status, "spool_bytes": self.spool.bytes,
                "disk_bytes": self.disk.bytes, "writable": self.writable,
                "inbox": self.admission.used, "outbox_in_memory": self.sender.pending}

    # --- lifecycle -----------------------------------------------------------------------------

    def idle(self) -> bool:
        return not self.admission.used and self.partition.idle() and self.sender.idle()

    # A timeout argument rather than a cancel scope: an embedding program asks
    # "drained within N seconds?" and wants the answer, not a Cancelled.
    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until everything accepted so far has been answered by Infinario.

        With a ``timeout`` (seconds), give up after it; True when drained.
        Whatever is not answered stays in the outbox either way.
        """
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while not self.idle():
                await self.progress.wait()
        return self.idle()

    async def wait_closed(self) -> None:
        await self._stop.wait()

    def stop(self) -> None:
        """Begin a graceful stop: answer 503 to new work, then drain for the grace period.

        A second call cuts the drain short: whatever is not delivered stays on disk.
        """
        if self._stop.is_set():
            self._hurry.set()
        self._begin_stop()

    def _begin_stop(self) -> None:
        if self.state is State.RUNNING:
            self.state = State.DRAINING
        self._stop.set()

    async def _drain_for_grace(self) -> bool:
        """Close the stages one after the other, each finishing its work, until all are
        done, the grace period ends or a second stop comes; True if all finished."""
        async with trio.open_nursery() as nursery:
            async def hurry() -> None:
                await self._hurry.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(hurry)
            with trio.move_on_after(self.config.grace):
                await self._close_stages()
            nursery.cancel_scope.cancel()
        return self.sender.finished.is_set()

    async def _close_stages(self) -> None:
        # Requests already past the accepting check finish their journal write
        # and hand-off first; new ones are answered 503.
        while self._accepting_now:
            await self.progress.wait()
        self._to_partition.close()
        await self.partition.finished.wait()  # every round committed and handed on
        self.sender.close()
        await self.sender.finished.wait()  # every lane's rows answered, answers recorded


def make_dialect(config: Config) -> Dialect:
    if config.api == "v2":
        projects = set(config.write_keys.values()) | set(config.project_auth)
        return V2({project: config.auth_header(project) for project in projects})
    return Legacy()


async def _startup(router: Router, store: st.Store, lanes: int, dialect: Dialect) -> int:
    """Upgrade old tables, re-deal the outbox, restore dedup and the counters; the spool."""
    config = router.config
    now = router.wall()

    def read(conn: Any) -> tuple[Any, ...]:
        from .migrate import migrate_v1

        migrate_v1(conn, lanes, dialect)
        outbox.rewrite(conn, lanes=lanes, dialect=dialect, now=now)
        return (st.max_seq(conn, "journal"), st.max_seq(conn, "outbox"),
                st.max_seq(conn, "dedup"),
                journal.load_dedup(conn, now - config.dedup_window - router.dedup.slice),
                journal.spool_bytes(conn) + outbox.spool_bytes(conn))

    journal_max, outbox_max, dedup_max, dedup_rows, spooled = await store.call(read)
    router.journal_seq.next = journal_max + 1
    router.outbox_seq.next = outbox_max + 1
    router.dedup_seq.next = dedup_max + 1
    for row, at, write_key, ids in dedup_rows:
        router.dedup.restore(write_key, journal.decode_ids(ids), at, row)
    router.spool.add(spooled)
    return int(spooled)


@asynccontextmanager
async def open_router(
    config: Config,
    *,
    http: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Router]:
    """Start the pipeline in a nursery of its own for the ``async with`` block.

    With ``http=True`` the Segment HTTP intake listens on ``config.listen`` (port 0
    picks a free one; ``router.url`` says which). With ``config.admin_listen`` set,
    the operator endpoints listen there (``router.admin_url``). On exit the router stops taking
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
    st.limit_wal(conn, config.spool_cap)
    store = st.Store(conn)
    metrics = Metrics()
    router = Router(config, store, metrics)
    limits = Limits(customer_keys=config.max_customer_keys, event_keys=config.max_event_keys,
                    event_types=config.max_event_types)
    policy = EventPolicy(renames=dict(config.renames), allow_campaign=config.allow_campaign)
    if transport is None:
        transport = infinario_transport(config.infinario_url,
                                        max_connections=config.concurrency)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            dialect = make_dialect(config)
            spooled = await _startup(router, store, config.concurrency, dialect)
            router.sender = Sender(
                backlog=outbox.SqliteBacklog(store), dialect=dialect, base_url=config.infinario_url,
                lanes=config.concurrency, transport=transport,
                timeout=config.request_timeout, retry_window=config.retry_window,
                rate_limit=config.effective_rate_limit, metrics=metrics, spool=router.spool,
                wall=router.wall, window=config.lane_window, linger=config.linger,
                changed=router.progress,
            )
            router.partition = Partition(
                store=store, write_keys=dict(config.write_keys), policy=policy, limits=limits,
                session_timeout=config.session_timeout, lanes=config.concurrency,
                active_customers=config.active_customers, metrics=metrics,
                offer=router.sender.offer, spool=router.spool, admission=router.admission,
                outbox_seq=router.outbox_seq, wall=router.wall, encode=dialect.encode,
                changed=router.progress,
            )
            send, receive = trio.open_memory_channel[Journaled](ADMISSION_CAPACITY)
            router._to_partition = send
            await nursery.start(router.partition.run, receive)
            await nursery.start(router.sender.run)
            nursery.start_soon(router.sender.watch_replays, store, router.outbox_seq)
            nursery.start_soon(_sweep_dedup, router)
            _gauges(router)
            if config.admin_listen is not None:
                router.admin_url = await serve_admin(nursery, router, config.admin_listen)
            if http:
                router.url = await serve_intake(nursery, router, config)
            router.state = State.RUNNING
            log.info("router started", url=router.url, admin_url=router.admin_url, api=config.api,
                     data_dir=str(config.data_dir), recovered_spool_bytes=spooled)
            try:
                yield router
            finally:
                router._begin_stop()
                if not await router._drain_for_grace():
                    log.warning("grace period over; undelivered commands stay in the outbox",
                                outbox_in_memory=router.sender.pending)
                nursery.cancel_scope.cancel()
    finally:
        router.state = State.CLOSED
        await transport.aclose()
        store.close()
        data_dir.unlock()
        log.info("router stopped")


async def serve_intake(nursery: trio.Nursery, pipeline: Pipeline, config: Config) -> str:
    """The Segment intake on ``config.listen``; its URL."""
    host, port = parse_listen(config.listen)
    intake = Intake(pipeline, webhook_secret=config.webhook_secret,
                    operator_paths=INTAKE_ALONE if config.admin_listen is None
                    else INTAKE_WITH_ADMIN)
    url: str = await nursery.start(partial(
        serve_http, intake, host, port,
        limits=ServerLimits(max_connections=config.max_connections)))
    return url


async def serve_admin(nursery: trio.Nursery, router: Operated, listen: str) -> str:
    host, port = parse_listen(listen)
    try:
        url: str = await nursery.start(serve_http, Admin(router), host, port)
    except (StartupError, BaseExceptionGroup) as exc:
        error = exc if isinstance(exc, StartupError) else router_error(exc)
        if not isinstance(error, StartupError):
            raise
        # The server names the setting "listen"; here it is the admin listener's.
        raise StartupError("admin-" + str(error).replace("--listen", "--admin-listen")) \
            from None
    return url


def _gauges(router: Router) -> None:
    m = router.metrics
    m.gauge("spool_bytes", "Bytes of journal and outbox not yet finished",
            lambda: router.spool.bytes)
    m.gauge("inbox_messages", "Accepted messages not yet turned into committed commands",
            lambda: router.admission.used)
    m.gauge("outbox_in_memory", "Commands held in memory by the sender",
            lambda: router.sender.pending)
    m.gauge("customers_active", "Customers in memory", lambda: len(router.partition.states))
    m.gauge("session_timers", "Open sessions with a pending deadline",
            lambda: len(router.partition.timers))
    m.gauge("dedup_ids", "messageIds remembered for dedup", lambda: len(router.dedup))
    m.counter_reader("store_commits_total", "Store transactions committed",
                     lambda: router.store.commits)


async def _sweep_dedup(router: Router) -> None:
    # A short window is swept often enough to be honoured; a long one once a minute.
    interval = min(DEDUP_SWEEP, max(0.05, router.config.dedup_window / 2))
    while True:
        await trio.sleep(interval)
        upto = router.dedup.expire(router.wall())
        if upto:
            try:
                await router.store.call(partial(journal.expire_dedup, upto_row=upto))
            except StorageUnavailable:
                pass  # the rows go with the next sweep: it deletes all up to a later row


async def serve(config: Config, *, task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Run the relay with its HTTP intake until SIGTERM/SIGINT, then stop gracefully.

    A second signal during the drain cuts it short; nothing acknowledged is lost,
    it waits on disk for the next start.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            await _serve(config, signals, task_status)
        except BaseExceptionGroup as group:
            # A startup error (busy port, unusable data dir) is one line, not a tree.
            first = router_error(group)
            if first is None:
                raise
            raise first from None


def router_error(group: BaseExceptionGroup[BaseException]) -> RouterError | None:
    leaves = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    errors = [exc for exc in leaves if isinstance(exc, RouterError)]
    if errors and all(isinstance(exc, RouterError | trio.Cancelled) for exc in leaves):
        return errors[0]
    return None


async def _serve(config: Config, signals: Any, task_status: trio.TaskStatus[Router]) -> None:
    running: list[Any] = []  # the Router, or the Redis mode's ClusterRouter
    signalled = trio.Event()
    async with trio.open_nursery() as watcher:
        async def watch() -> None:
            async for signum in signals:
                log.info("signal received; draining", signal=signal.Signals(signum).name)
                signalled.set()
                for router in running:
                    router.stop()

        watcher.start_soon(watch)
        opener: Any = open_router
        if config.redis is not None:
            from .cluster.node import open_cluster

            opener = open_cluster
        async with opener(config, http=True) as router:
            running.append(router)
            if signalled.is_set():
                router.stop()
            task_status.started(router)
            await router.wait_closed()
        watcher.cancel_scope.cancel()
