"""The Infinario sender: lanes of outbox rows, bounded concurrency, retries, dead letters.

Commands are dealt to ``concurrency`` lanes by customer (``customer % lanes``).
Each lane is one task with at most one request in flight, so one customer's
commands are never in two requests at once and go out in the order the actor
produced them; the number of lanes is the number of requests in flight, and the
HTTP pool is sized to match.

The customers stage hands each lane its committed rows through a bounded memory
channel. When the channel is full (Infinario slow or down) the stage stops
handing that lane anything: the rows stay only in the outbox on disk, and the
lane reads them back in order once it has worked through what it holds. Memory
stays flat however long the backlog grows.

What an answer means for each command is decided by the pure ``plan``; the
lane applies it, and one retirer task records the answers in the store in
batches, so a lane never waits for a commit before its next request.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import msgspec
import structlog
import trio

from . import outbox
from . import store as st
from .broadcast import Broadcast
from .commands import encode_command
from .infinario import MAX_COMMANDS, OK, Dialect, Verdict, join_body
from .metrics import Metrics
from .outbox import OutboxRow
from .spool import Spool
from .storage import StorageUnavailable
from .transport import Prepared, Transport

log = structlog.get_logger("router.sender")

DEFAULT_LANE_WINDOW = 500
DEFAULT_LINGER = 0.05
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
# Rows waiting for a busy lane in its channel, each at most one request's worth:
# a lane holds at most its window plus these in memory; past them, rows wait on disk.
LANE_CHANNEL_ROWS = 4
REPLAY_INTERVAL = 2.0
RETIRE_RETRY = 0.2  # seconds before answers the disk did not take are recorded again
_json_encode = msgspec.json.Encoder().encode


# --- the plan: what an answer means for each command, pure --------------------------------------


@dataclass(slots=True)
class Plan:
    """What to do after one request: positions into the batch by outcome."""

    done: list[int] = field(default_factory=list)
    dead: list[tuple[int, str, str]] = field(default_factory=list)  # (position, status, reason)
    retry: list[int] = field(default_factory=list)
    backoff: bool = False
    delay: float | None = None  # the server's Retry-After, when it gave one
    outcome: str = "answered"


def plan(verdict: Verdict, first_at: Sequence[float], *, now: float,
         retry_window: float) -> Plan:
    """Decide each command's fate from Infinario's verdict on a request.

    ``first_at`` holds, per command, when it was first committed: a command to
    be retried past the retry window is dead-lettered instead.
    """
    result = Plan()
    limit = now - retry_window

    def retry_or_expire(position: int, reason: str) -> None:
        if first_at[position] < limit:
            result.dead.append((position, "expired", f"retry window exceeded; last: {reason}"))
        else:
            result.retry.append(position)

    if verdict.results is not None:
        if verdict.results.count(OK) == len(verdict.results):
            # Nearly every answer: counting the shared OK is one pass in C.
            result.done = list(range(len(verdict.results)))
            return result
        for position, answer in enumerate(verdict.results):
            if answer.outcome == "ok":
                result.done.append(position)
            elif answer.outcome == "retry":
                retry_or_expire(position, "Infinario answered retry")
            else:
                result.dead.append((position, "error", "; ".join(answer.errors)))
        result.backoff = bool(result.retry)
    elif verdict.auth:
        # Not dead-lettered, whatever the retry window: the data is fine, the
        # configuration is not.
        result.outcome = "auth"
        result.retry = list(range(len(first_at)))
        result.backoff = True
    elif verdict.retry:
        result.outcome = "retry"
        for position in range(len(first_at)):
            retry_or_expire(position, verdict.reason)
        result.backoff = True
        result.delay = verdict.retry_after
    else:
        result.outcome = "refused"
        result.dead = [(position, "rejected", verdict.reason) for position in range(len(first_at))]
    return result


# --- lanes ---------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Lane:
    index: int
    send: trio.MemorySendChannel[OutboxRow]
    inbox: trio.MemoryReceiveChannel[OutboxRow]
    rows: deque[OutboxRow] = field(default_factory=deque)
    pending: int = 0  # commands held in ``rows`` that are not final
    # At start, and whenever the channel was full, rows exist only on disk: the
    # lane reads them back (seq > loaded_upto) before taking from the channel again.
    backlog_on_disk: bool = True
    backlog_upto: int = 0
    loaded_upto: int = 0
    # Rows handed to the channel and not yet taken (a waiting receiver gets a row
    # straight from send_nowait, so the channel's own buffer can look empty).
    queued: int = 0
    queued_commands: int = 0
    busy: bool = False
    failures: int = 0


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
class _Answers:
    """Answers not yet recorded in the store, collected from every lane."""

    finished: list[OutboxRow] = field(default_factory=list)
    partial: dict[int, OutboxRow] = field(default_factory=dict)
    dead: list[tuple[Any, ...]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finished or self.partial or self.dead)

    def then(self, later: _Answers) -> _Answers:
        """These answers followed by ``later`` ones, as one batch to record."""
        done = {row.seq for row in later.finished}
        partial = {seq: row for seq, row in self.partial.items() if seq not in done}
        partial.update(later.partial)
        return _Answers(self.finished + later.finished, partial, self.dead + later.dead)


class Sender:
    def __init__(
        self,
        *,
        backlog: outbox.Backlog,
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
        changed: Broadcast | None = None,
        bucket: TokenBucket | None = None,
        may_send: Callable[[], bool] | None = None,
    ) -> None:
        self.backlog = backlog
        self.dialect = dialect
        self.base_url = base_url
        self.transport = transport
        self._timeout = httpx.Timeout(timeout).as_dict()
        self.retry_window = retry_window
        # Senders that share one rate limit (a worker's partitions) share a bucket.
        self.bucket = bucket or (TokenBucket(rate_limit) if rate_limit else None)
        # Asked right before each request: False means this sender's rows may be another's
        # to send now (a partition whose lease is in doubt); the lane then waits to be
        # cancelled instead of posting a copy that could land after the new owner's.
        self.may_send = may_send
        self.posting = 0  # requests on the wire now
        self.metrics = metrics
        self.spool = spool
        self.wall = wall
        self.window = window
        self.linger = linger
        self.lanes = []
        for index in range(lanes):
            send, receive = trio.open_memory_channel[OutboxRow](LANE_CHANNEL_ROWS)
            self.lanes.append(Lane(index, send, receive))
        # Fired when a lane or the retirer may have gone idle.
        self.changed = changed or Broadcast()
        self._answering = Broadcast()  # fired whenever Infinario processes a request
        self._answers = _Answers()
        self._answers_ready = trio.Event()
        self._retiring = False
        self._auth_reported: set[str] = set()
        self._prepared: dict[str, Prepared] = {}
        self._lanes_running = lanes
        self.finished = trio.Event()  # run() has ended

    # --- the customers stage's side --------------------------------------------------------

    def offer(self, row: OutboxRow) -> None:
        """Take a committed row; never blocks: a full lane leaves it on disk."""
        lane = self.lanes[row.lane]
        if not lane.backlog_on_disk:
            try:
                lane.send.send_nowait(row)
                lane.queued += 1
                lane.queued_commands += row.remaining
                return
            except (trio.WouldBlock, trio.ClosedResourceError):
                lane.backlog_on_disk = True
        lane.backlog_upto = max(lane.backlog_upto, row.seq)

    @property
    def pending(self) -> int:
        """Commands held in memory, not yet final."""
        return sum(lane.pending + lane.queued_commands for lane in self.lanes)

    def idle(self) -> bool:
        return not self._answers and not self._retiring and all(
            not lane.pending and not lane.backlog_on_disk and not lane.busy and not lane.queued
            for lane in self.lanes)

    async def wait_idle(self) -> None:
        while not self.idle():
            await self.changed.wait()

    # --- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the lanes and the retirer until ``close`` and their work is done."""
        try:
            async with trio.open_nursery() as nursery:
                for lane in self.lanes:
                    nursery.start_soon(self._run_lane, lane)
                nursery.start_soon(self._retirer)
                task_status.started()
        finally:
            self.finished.set()

    def quiet(self) -> bool:
        """No request on the wire and every answer recorded."""
        return not self.posting and not self._answers and not self._retiring

    def reload(self) -> None:
        """Rows were stored that were never offered: each lane reads its backlog again."""
        for lane in self.lanes:
            lane.backlog_on_disk = True

    def close(self) -> None:
        """No more rows: each lane finishes what it holds and on disk, then ends."""
        for lane in self.lanes:
            lane.send.close()

    async def _run_lane(self, lane: Lane) -> None:
        try:
            await self._lane(lane)
        finally:
            self._lanes_running -= 1
            self._answers_ready.set()  # the retirer ends after the last lane

    async def _lane(self, lane: Lane) -> None:
        while True:
            self._take_offered(lane)
            if not lane.pending:
                if lane.backlog_on_disk:
                    await self._refill(lane)
                    continue
                self.changed.fire()
                try:
                    row = await lane.inbox.receive()
                except trio.EndOfChannel:
                    return
                self._received(lane, row)
                continue
            if lane.pending < MAX_COMMANDS and not lane.backlog_on_disk and self.linger > 0:
                # Wait briefly for a fuller request: under a trickle of single
                # messages, one request per command would cost far more than the
                # few milliseconds of delivery delay.
                with trio.move_on_after(self.linger):
                    while lane.pending < MAX_COMMANDS:
                        try:
                            row = await lane.inbox.receive()
                        except trio.EndOfChannel:
                            break
                        self._received(lane, row)
            lane.busy = True
            try:
                await self._send(lane, self._take(lane))
            finally:
                lane.busy = False

    def _received(self, lane: Lane, row: OutboxRow) -> None:
        lane.queued -= 1
        lane.queued_commands -= row.remaining
        self._hold(lane, row)

    def _hold(self, lane: Lane, row: OutboxRow) -> None:
        if row.seq <= lane.loaded_upto:
            return  # read from disk already
        lane.rows.append(row)
        lane.pending += row.remaining
        lane.loaded_upto = row.seq

    def _take_offered(self, lane: Lane) -> None:
        """Move rows waiting in the channel into the lane while its window has room."""
        while lane.pending < self.window:
            try:
                row = lane.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            self._received(lane, row)

    async def _refill(self, lane: Lane) -> None:
        """Read the lane's rows that exist only on disk, in order."""
        after = lane.loaded_upto
        limit = max(1, self.window // MAX_COMMANDS)
        rows = await self.backlog.load_lane(lane.index, after, limit)
        for row in rows:
            self._hold(lane, row)
        if len(rows) < limit and lane.loaded_upto >= lane.backlog_upto:
            lane.backlog_on_disk = False

    def _take(self, lane: Lane) -> list[tuple[OutboxRow, int]]:
        """The lane's next request: its first commands not yet final, one project, at most 50."""
        batch: list[tuple[OutboxRow, int]] = []
        project = None
        for row in lane.rows:
            if not row.remaining:
                continue
            if project is None:
                project = row.project
            elif row.project != project:
                return batch
            final = row.final
            for position in range(len(row.commands)):
                if final[position]:
                    continue
                batch.append((row, position))
                if len(batch) == MAX_COMMANDS:
                    return batch
        return batch

    async def _send(self, lane: Lane, batch: list[tuple[OutboxRow, int]]) -> None:
        commands = [row.commands[position] for row, position in batch]
        project = batch[0][0].project
        if self.bucket is not None:
            await self.bucket.acquire()
        for row in {id(row): row for row, _ in batch}.values():
            row.attempts += 1
        if self.may_send is not None and not self.may_send():
            await trio.sleep_forever()
        started = trio.current_time()
        self.posting += 1
        try:
            status, content, retry_after = await self._post(project, join_body(commands))
            verdict = self.dialect.verdict(status, content, len(batch), retry_after)
        except httpx.HTTPError as exc:
            verdict = Verdict(retry=True, reason=f"{type(exc).__name__}: {exc}")
        finally:
            # No await between here and queueing the answers: ``quiet`` never sees a
            # request that is neither posting nor answered.
            self.posting -= 1
        now = self.wall()
        decided = plan(verdict, [row.first_at for row, _ in batch], now=now,
                       retry_window=self.retry_window)
        self.metrics.inc("infinario_requests_total", outcome=decided.outcome)
        self.metrics.observe("infinario_request_seconds", trio.current_time() - started,
                             outcome=decided.outcome)
        if decided.outcome == "answered" and (not decided.retry or decided.done):
            self._answering.fire()
        if decided.done:
            self.metrics.inc("commands_delivered_total", len(decided.done))
        if decided.retry:
            self.metrics.inc("commands_retried_total", len(decided.retry))
        self._log(decided, verdict, lane, project, batch)
        self._finalize_many(lane, batch, decided.done)
        for position, fate, reason in decided.dead:
            row, index = batch[position]
            command = self.dialect.decode(row.commands[index], row.project)
            self._answers.dead.append(
                (now, row.project, row.customers[index], encode_command(command), fate,
                 _json_encode([reason]).decode(), row.attempts, row.first_at, now))
            self.metrics.inc("dead_letters_total", reason=fate)
            log.error("command dead-lettered", status=fate, reason=reason,
                      type=command.event_type, kind=command.kind)
        self._finalize_many(lane, batch, [position for position, _, _ in decided.dead])
        self._answers_ready.set()
        if decided.backoff:
            await self._backoff(lane, decided.delay)
        else:
            lane.failures = 0

    def _finalize_many(self, lane: Lane, batch: list[tuple[OutboxRow, int]],
                       positions: list[int]) -> None:
        """Mark the commands at ``positions`` (ascending) final, settling each row once.

        ``_take`` builds a request row by row, so a row's commands are next to
        each other: it is settled when the next row starts, and the last at the end.
        """
        last: OutboxRow | None = None
        for position in positions:
            row, index = batch[position]
            row.final[index] = 1
            row.remaining -= 1
            if row is not last:
                if last is not None:
                    self._settle(lane, last)
                last = row
        lane.pending -= len(positions)
        if last is not None:
            self._settle(lane, last)

    def _settle(self, lane: Lane, row: OutboxRow) -> None:
        """File a row whose commands were just made final: partly answered or done."""
        if row.remaining:
            self._answers.partial[row.seq] = row
            return
        self._answers.partial.pop(row.seq, None)
        self._answers.finished.append(row)
        self.metrics.observe("delivery_lag_seconds", self.wall() - row.first_at)
        rows = lane.rows
        while rows and not rows[0].remaining:
            rows.popleft()

    def _log(self, decided: Plan, verdict: Verdict, lane: Lane, project: str,
             batch: list[tuple[OutboxRow, int]]) -> None:
        if decided.outcome == "auth":
            if project not in self._auth_reported:
                self._auth_reported.add(project)
                log.error(
                    "Infinario refused the credentials; fix infinario-auth for this project "
                    "and restart. Commands are kept and retried.",
                    project=project, reason=verdict.reason,
                )
        elif decided.outcome == "retry":
            log.warning("Infinario request failed; retrying", reason=verdict.reason,
                        lane=lane.index, attempt=batch[0][0].attempts)
        elif decided.outcome == "refused":
            log.error("Infinario refused the request; dead-lettering its commands",
                      reason=verdict.reason, count=len(batch))

    async def _post(self, project: str, body: bytes) -> tuple[int, bytes, str | None]:
        """One POST straight through the transport: status, body, Retry-After.

        A client would add cookies, redirects, auth flows and event hooks that
        Infinario's API never uses, at a cost that showed in every request. The
        relay's own transport takes a request head built once per project.
        """
        transport = self.transport
        if isinstance(transport, Transport):
            prepared = self._prepared.get(project)
            if prepared is None:
                prepared = self._prepared[project] = transport.prepare_post(httpx.Request(
                    "POST", self.dialect.url(self.base_url, project),
                    headers=self.dialect.headers(project)))
            status, content, retry_after = await transport.post(prepared, body, self._timeout)
            return status, content, None if retry_after is None else retry_after.decode(
                "latin-1")
        request = httpx.Request("POST", self.dialect.url(self.base_url, project),
                                headers=self.dialect.headers(project), content=body,
                                extensions={"timeout": self._timeout})
        response = await transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, content, response.headers.get("retry-after")

    async def _backoff(self, lane: Lane, retry_after: float | None) -> None:
        lane.failures += 1
        if retry_after is not None:
            await trio.sleep(retry_after)
            return
        ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(lane.failures - 1, 16))
        # Lanes back off independently, but one answered request means Infinario
        # is back: the others stop waiting out long backoffs then.
        with trio.move_on_after(ceiling * random.uniform(0.5, 1.0)):
            await self._answering.wait()

    # --- recording answers -----------------------------------------------------------------

    async def _retirer(self) -> None:
        """Record every lane's answers in the store, as many as have come in per commit.

        A crash before an answer is recorded only means that command is sent
        again, which is the at-least-once promise anyway.
        """
        while True:
            if self._lanes_running:
                # Not once the lanes are done: the last one may have ended (and set the
                # event this loop then replaced) while the answers before it were recorded.
                await self._answers_ready.wait()
            self._answers_ready = trio.Event()
            answers, self._answers = self._answers, _Answers()
            if not answers:
                if not self._lanes_running:
                    return
                continue
            self._retiring = True
            try:
                finished = [row.seq for row in answers.finished]
                partial = [(bytes(row.final), row.seq) for row in answers.partial.values()]
                try:
                    await self.backlog.record(finished, partial, answers.dead)
                except StorageUnavailable:
                    # Nothing was recorded: keep the answers, record them with the next.
                    self._answers = answers.then(self._answers)
                    self._answers_ready.set()
                    await trio.sleep(RETIRE_RETRY)
                    continue
                self.spool.add(-sum(row.size for row in answers.finished))
            finally:
                self._retiring = False
                self.changed.fire()

    # --- dead letters replayed while running -----------------------------------------------

    async def watch_replays(self, store: st.Store, seqs: st.SeqCounter,
                            interval: float = REPLAY_INTERVAL) -> None:
        """Pick up dead letters marked for replay by ``infinario-router dead-letters replay``."""
        while True:
            await trio.sleep(interval)
            try:
                letters = await store.call(outbox.marked)
                if not letters:
                    continue
                # Rows are numbered here, in the trio thread, like every other outbox row.
                made = outbox.replay_rows(letters, lanes=len(self.lanes), dialect=self.dialect,
                                          now=self.wall(), seqs=seqs)
                moved = await store.call(partial(
                    outbox.replay, ids=[letter[0] for letter in letters],
                    records=[record for record, _ in made]))
            except StorageUnavailable:
                continue  # the marks stay; the next look picks them up
            if moved:
                log.info("dead letters replayed", count=len(letters))
                self.spool.add(sum(row.size for _, row in made))
                for _, row in made:
                    self.offer(row)

