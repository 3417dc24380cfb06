"""The Infinario sender: lanes of outbox commands, bounded concurrency, retries.

Commands are dealt to ``concurrency`` lanes by customer (``customer % lanes``).
Each lane is one task with at most one request in flight, so one customer's
commands are never in two requests at once and go out in the order the actor
produced them; the number of lanes is the number of requests in flight, and the
HTTP pool is sized to match.

A lane keeps a bounded window of its commands in memory. When more arrive than
fit (Infinario slow or down), the lane "spills": the extra commands stay only in
the outbox on disk and the lane reads them back in order when its window
empties. Memory stays flat however long the backlog grows.
"""

from __future__ import annotations

import random
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import msgspec
import structlog
import trio

from . import store as st
from .actors import OutboxRow, Spool, spool_size
from .commands import Encoded, decode_encoded
from .infinario import MAX_COMMANDS, Dialect, Verdict
from .metrics import Metrics

log = structlog.get_logger("router.sender")

DEFAULT_LANE_WINDOW = 500
DEFAULT_LINGER = 0.05
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
_json_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class Lane:
    index: int
    items: deque[OutboxRow] = field(default_factory=deque)
    # Rows with seq > loaded_upto have never been in memory; when spilled they
    # are read back from the outbox.
    loaded_upto: int = 0
    spilled: bool = True
    spilled_max: int = 0
    wake: trio.Event = field(default_factory=trio.Event)
    failures: int = 0
    busy: bool = False


class TokenBucket:
    """Requests per minute to Infinario, spent before each request is sent."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = trio.current_time()
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = trio.current_time()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await trio.sleep((1 - self.tokens) / self.rate)


@dataclass(slots=True)
class _Finished:
    done: list[OutboxRow] = field(default_factory=list)
    dead: list[tuple[OutboxRow, str, str]] = field(default_factory=list)


class Sender:
    def __init__(
        self,
        *,
        store: st.Store,
        dialect: Dialect,
        base_url: str,
        lanes: int,
        transport: httpx.AsyncBaseTransport,
        timeout: float,
        retry_window: float,
        rate_limit: int | None,
        metrics: Metrics,
        spool: Spool,
        wall: Callable[[], float],
        window: int = DEFAULT_LANE_WINDOW,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        self.store = store
        self.dialect = dialect
        self.base_url = base_url
        self.transport = transport
        self._timeout = httpx.Timeout(timeout).as_dict()
        self.retry_window = retry_window
        self.bucket = TokenBucket(rate_limit) if rate_limit else None
        self.metrics = metrics
        self.spool = spool
        self.wall = wall
        self.window = window
        self.linger = linger
        self.lanes = [Lane(i) for i in range(lanes)]
        self._auth_reported: set[str] = set()
        self._answering = trio.Event()  # set whenever Infinario answers a request
        self._finishing = 0
        self._nursery: trio.Nursery
        self._changed = trio.Event()

    # --- intake side -----------------------------------------------------------------------

    def deliver(self, rows: Sequence[OutboxRow]) -> None:
        """Take committed outbox rows (called by the directory after its commit)."""
        for row in rows:
            lane = self.lanes[row.lane]
            if lane.spilled or len(lane.items) >= self.window:
                lane.spilled = True
                if row.seq > lane.spilled_max:
                    lane.spilled_max = row.seq
            elif row.seq > lane.loaded_upto:
                lane.items.append(row)
                lane.loaded_upto = row.seq
            lane.wake.set()

    @property
    def pending(self) -> int:
        return sum(len(lane.items) for lane in self.lanes)

    def idle(self) -> bool:
        return not self._finishing and all(
            not lane.items and not lane.spilled and not lane.busy for lane in self.lanes)

    async def wait_idle(self) -> None:
        while not self.idle():
            self._changed = trio.Event()
            await self._changed.wait()

    # --- lanes -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for lane in self.lanes:
                nursery.start_soon(self._lane, lane)
            task_status.started()

    async def _lane(self, lane: Lane) -> None:
        while True:
            if not lane.items:
                if lane.spilled:
                    await self._refill(lane)
                    continue
                self._changed.set()
                lane.wake = trio.Event()
                await lane.wake.wait()
                continue
            if len(lane.items) < MAX_COMMANDS and not lane.spilled and self.linger > 0:
                # Wait briefly for a fuller request: under a trickle of single
                # messages, one request per command would cost far more than the
                # few milliseconds of delivery delay.
                with trio.move_on_after(self.linger):
                    while len(lane.items) < MAX_COMMANDS:
                        lane.wake = trio.Event()
                        await lane.wake.wait()
            batch = self._take(lane)
            lane.busy = True
            try:
                await self._send(lane, batch)
            finally:
                lane.busy = False

    async def _refill(self, lane: Lane) -> None:
        after = lane.loaded_upto
        rows = await self.store.call(
            lambda conn: st.outbox_load(conn, lane.index, after, self.window)
        )
        for seq, customer, body, first_at, size in rows:
            lane.items.append(
                OutboxRow(seq, lane.index, customer, decode_encoded(body), body, first_at,
                          size=size)
            )
            lane.loaded_upto = seq
        if len(rows) < self.window and lane.spilled_max <= lane.loaded_upto:
            lane.spilled = False

    def _take(self, lane: Lane) -> list[OutboxRow]:
        # One project per request: v2 puts the token in the URL, and the legacy
        # dialect gains nothing from mixing.
        items = lane.items
        project = items[0].command.project
        batch: list[OutboxRow] = []
        for row in items:
            if row.command.project != project or len(batch) == MAX_COMMANDS:
                break
            batch.append(row)
        return batch

    async def _send(self, lane: Lane, batch: list[OutboxRow]) -> None:
        project = batch[0].command.project
        if self.bucket is not None:
            await self.bucket.acquire()
        commands: list[Encoded] = [row.command for row in batch]
        for row in batch:
            row.attempts += 1
        try:
            status, content, retry_after = await self._post(
                self.dialect.url(self.base_url, project),
                self.dialect.headers(project),
                self.dialect.body(commands),
            )
            verdict = self.dialect.verdict(status, content, len(batch), retry_after)
        except httpx.HTTPError as exc:
            verdict = Verdict(retry=True, reason=f"{type(exc).__name__}: {exc}")
        finished = _Finished()
        keep: list[OutboxRow] = []  # rows of this batch that stay at the head of the lane
        delay: float | None = None
        backoff = False
        if verdict.results is not None:
            self.metrics.inc("infinario_requests_total", outcome="answered")
            if not verdict.results or verdict.results[0].outcome != "retry":
                self._answering.set()
                self._answering = trio.Event()
            for row, result in zip(batch, verdict.results, strict=True):
                if result.outcome == "ok":
                    finished.done.append(row)
                elif result.outcome == "retry":
                    keep.append(row)
                else:
                    finished.dead.append((row, "error", "; ".join(result.errors)))
            self.metrics.inc("commands_delivered_total", len(finished.done))
            if keep:
                self.metrics.inc("commands_retried_total", len(keep))
                keep = self._expire(keep, "Infinario answered retry", finished)
                backoff = True
        elif verdict.auth:
            self.metrics.inc("infinario_requests_total", outcome="auth")
            if project not in self._auth_reported:
                self._auth_reported.add(project)
                log.error(
                    "Infinario refused the credentials; fix infinario-auth for this project "
                    "and restart. Commands are kept and retried.",
                    project=project, reason=verdict.reason,
                )
            # Not dead-lettered, whatever the retry window: the data is fine, the
            # configuration is not.
            keep = batch
            backoff = True
        elif verdict.retry:
            self.metrics.inc("infinario_requests_total", outcome="retry")
            log.warning("Infinario request failed; retrying", reason=verdict.reason,
                        lane=lane.index, attempt=batch[0].attempts)
            keep = self._expire(batch, verdict.reason, finished)
            backoff = True
            delay = verdict.retry_after
        else:
            self.metrics.inc("infinario_requests_total", outcome="refused")
            log.error("Infinario refused the request; dead-lettering its commands",
                      reason=verdict.reason, count=len(batch))
            for row in batch:
                finished.dead.append((row, "rejected", verdict.reason))
        # The batch is the head of the lane; what must be sent again goes back there.
        items = lane.items
        for _ in batch:
            items.popleft()
        items.extendleft(reversed(keep))
        if finished.done or finished.dead:
            # The lane goes on at once; the outbox rows are retired in the next
            # group commit. A crash before it only means those commands are sent
            # again, which is the at-least-once promise anyway.
            self._finishing += 1
            self._nursery.start_soon(self._finish, finished)
        if backoff:
            await self._backoff(lane, delay)
        else:
            lane.failures = 0

    async def _post(
        self, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str | None]:
        """One POST straight through the transport: status, body, Retry-After.

        A client would add cookies, redirects, auth flows and event hooks that
        Infinario's API never uses, at a cost that showed in every request.
        """
        request = httpx.Request("POST", url, headers=headers, content=body,
                                extensions={"timeout": self._timeout})
        response = await self.transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, content, response.headers.get("retry-after")

    def _expire(
        self, rows: list[OutboxRow], reason: str, finished: _Finished
    ) -> list[OutboxRow]:
        """Dead-letter the rows past the retry window; return the others."""
        limit = self.wall() - self.retry_window
        keep = []
        for row in rows:
            if row.first_at < limit:
                finished.dead.append((row, "expired", f"retry window exceeded; last: {reason}"))
            else:
                keep.append(row)
        return keep

    async def _backoff(self, lane: Lane, retry_after: float | None) -> None:
        lane.failures += 1
        if retry_after is not None:
            delay = retry_after
        else:
            ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(lane.failures - 1, 16))
            delay = ceiling * random.uniform(0.5, 1.0)
            # Lanes back off independently, but one answered request means
            # Infinario is back: the others stop waiting out long backoffs then.
            with trio.move_on_after(delay):
                await self._answering.wait()
            return
        await trio.sleep(delay)

    async def _finish(self, finished: _Finished) -> None:
        try:
            await self._retire(finished)
        finally:
            self._finishing -= 1
            self._changed.set()

    async def _retire(self, finished: _Finished) -> None:
        now = self.wall()
        dead = [
            (row.seq, row.command.project, row.customer, row.body, status,
             _json_encode([reason]).decode(), row.attempts, row.first_at, now)
            for row, status, reason in finished.dead
        ]
        freed = sum(row.size for row in finished.done)
        freed += sum(row.size for row, _, _ in finished.dead)
        done = [row.seq for row in finished.done]
        await self.store.call(lambda conn: _finish(conn, done, dead, now))
        self.spool.add(-freed)
        for row, status, reason in finished.dead:
            self.metrics.inc("dead_letters_total", status=status)
            log.error("command dead-lettered", status=status, reason=reason,
                      project=row.command.project, type=row.command.event_type,
                      kind=row.command.kind)
        self._changed.set()

    # --- dead letters replayed while running -----------------------------------------------

    async def watch_replays(self, counter: st.SeqCounter, interval: float = 2.0) -> None:
        """Pick up dead letters marked for replay by ``infinario-router dead-letters replay``."""
        while True:
            await trio.sleep(interval)
            now = self.wall()  # trio's clock is not readable from the writer thread
            rows = await self.store.call(
                partial(replay_marked, counter=counter, lanes=len(self.lanes), now=now)
            )
            if rows:
                log.info("dead letters replayed", count=len(rows))
                self.spool.add(sum(r.size for r in rows))
                self.deliver(rows)


def _finish(
    conn: sqlite3.Connection, done: list[int], dead: Sequence[tuple[Any, ...]], now: float
) -> None:
    if dead:
        conn.executemany(
            "INSERT INTO dead_letters(created_at, project, customer, command, origin, status,"
            " errors, attempts, first_at, last_at) SELECT ?, ?, ?, ?, origin, ?, ?, ?, ?, ?"
            " FROM outbox WHERE seq = ?",
            [(now, project, customer, body, status, errors, attempts, first_at, last_at, seq)
             for seq, project, customer, body, status, errors, attempts, first_at, last_at
             in dead],
        )
    st.delete_seqs(conn, "outbox", [*done, *(row[0] for row in dead)])


def replay_marked(
    conn: sqlite3.Connection, counter: st.SeqCounter, lanes: int, now: float
) -> list[OutboxRow]:
    """Move dead letters marked for replay back into the outbox, with fresh retry windows."""
    rows = conn.execute(
        "SELECT id, customer, command, origin FROM dead_letters WHERE replay = 1 "
        "AND command IS NOT NULL ORDER BY id"
    ).fetchall()
    out: list[OutboxRow] = []
    for dead_id, customer, body, origin in rows:
        seq = counter.next
        counter.next += 1
        lane = int(customer) % lanes
        conn.execute(
            "INSERT INTO outbox(seq, lane, customer, body, origin, first_at) VALUES(?,?,?,?,?,?)",
            (seq, lane, customer, body, origin, now),
        )
        conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
        out.append(OutboxRow(seq, lane, int(customer), decode_encoded(body), body, now,
                             size=spool_size(body, origin)))
    return out
