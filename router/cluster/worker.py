"""The worker side of the Redis Streams mode: the partitions this process holds.

``ProjectWorker`` keeps this process's fair share of a project's partitions
(``leases.py``) and runs one ``PartitionTask`` per partition it holds. A
partition task owns that partition's customers (``actors.py``): it reads the
partition's input stream in rounds, runs the turns, and commits each round in
one fenced, idempotent step (``commit.lua``), then hands the round's commands
to its own sender (the embedded relay's, one lane, reading ``out:{P}:<p>``).

A task whose lease is lost stops; whatever it had not committed is still
pending in the stream and the next owner replays it. An owner that gives a
partition up (a rebalance, a stop) first lets its request in flight finish and
records the answers, then marks the partition handed back: the next owner sends
at once. A task that took a partition over without that mark (its owner died)
waits ``--request-timeout`` before it sends anything the last owner may still
have had in flight, so a dead owner's request cannot land after the resend of
the same commands. A stalled owner (a pause, a frozen VM)
is not dead: its sender checks that the lease is still trusted right before
each request, so on waking it posts nothing the next owner may have resent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import TypeVar

import coredis
import httpx
import structlog
import trio
from coredis.exceptions import RedisError

from .. import outbox
from .. import store as st
from ..broadcast import Broadcast
from ..customer import state_decoder
from ..infinario import Dialect
from ..mapping import EventPolicy, Limits
from ..metrics import Metrics
from ..outbox import OutboxRow
from ..sender import Sender, TokenBucket
from ..spool import Spool
from .actors import Entry, PartitionActors, Round
from .backlog import RedisBacklog, seq_of
from .commit import Commits, OutboxEntry, Outcome, RoundWrites
from .inbox import Entry as InboxEntry
from .inbox import Fenced, Inbox
from .keys import Keys
from .leases import DEFAULT_TTL, Lease, Leases
from .schema import NeedsSchema, SharedSchema
from .scripts import source

log = structlog.get_logger("router.cluster.worker")
T = TypeVar("T")

READ_COUNT = 1000  # entries per round, as the embedded relay's rounds
POLL_MIN, POLL_MAX = 0.005, 0.1  # seconds between reads of an idle partition
RETRY = 0.5  # seconds before a step that could not reach Redis is tried again
SCHEMA_ATTEMPTS = 50  # schema round trips one round may need before something is wrong


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What every partition task of a process shares."""

    policy: EventPolicy
    limits: Limits
    session_timeout: float
    dialect: Dialect
    base_url: str
    transport: httpx.AsyncBaseTransport
    request_timeout: float
    retry_window: float
    bucket: TokenBucket | None
    lane_window: int
    linger: float
    active_customers: int
    lease_ttl: float = DEFAULT_TTL


class PartitionTask:
    """One held partition: its customers' turns, its commits and its sender."""

    def __init__(self, client: coredis.Redis[bytes], keys: Keys, lease: Lease,
                 schema: SharedSchema, settings: WorkerSettings, metrics: Metrics,
                 wall: Callable[[], float], spool: Spool, progress: Broadcast) -> None:
        self.client = client
        self.keys = keys
        self.lease = lease
        self.partition = lease.partition
        self.token = lease.token
        self.schema = schema
        self.settings = settings
        self.metrics = metrics
        self.wall = wall
        self.progress = progress
        self.inbox = Inbox(client, keys, self.partition)
        self._handed = client.register_script(source("handed"))
        self.commits = Commits(client, keys)
        self.actors = self._actors()
        self.round_id = 0
        # --active-customers spread over the project's partitions, wherever they run.
        self.cache_size = max(1_000, settings.active_customers // keys.partitions)
        self.sender = Sender(
            backlog=RedisBacklog(client, self.commits, keys, self.partition, self.token),
            dialect=settings.dialect, base_url=settings.base_url, lanes=1,
            transport=settings.transport, timeout=settings.request_timeout,
            retry_window=settings.retry_window, rate_limit=None, metrics=metrics, spool=spool,
            wall=wall, window=settings.lane_window, linger=settings.linger, changed=progress,
            bucket=settings.bucket, may_send=lease.valid)

    def _actors(self) -> PartitionActors:
        s = self.settings
        return PartitionActors(project=self.keys.project, schema=self.schema, policy=s.policy,
                               session_timeout=s.session_timeout, encode=s.dialect.encode)

    async def run(self) -> None:
        """Until the lease is lost (``Fenced``) or the task is cancelled."""
        async with trio.open_nursery() as nursery:
            backlog = await self._redis(lambda: self.client.xlen(
                self.keys.outbox(self.partition)))
            handed = await self._redis(lambda: self.client.getdel(
                self.keys.handed(self.partition)))
            # The sender reads the last owner's rows from the stream before new ones; it
            # waits first unless the last owner said it left nothing in flight.
            wait = self.settings.request_timeout if backlog and handed is None else 0.0
            nursery.start_soon(self._send, wait)
            await self._load_timers()
            await self._play(await self._redis(lambda: self.inbox.recover(self.token)))
            poll = POLL_MIN
            while True:
                batch = await self._redis(lambda: self.inbox.read(self.token, READ_COUNT))
                if batch.entries or self.actors.timers.next_deadline() <= self.wall():
                    await self._play(batch.entries)
                    poll = POLL_MIN
                    continue
                until_timer = self.actors.timers.next_deadline() - self.wall()
                await trio.sleep(min(poll, max(0.0, until_timer)))
                poll = min(POLL_MAX, poll * 2)

    async def hand_back(self) -> None:
        """The lease is being given up (a rebalance, a stop): once no request is in flight
        and every answer is recorded, tell the next owner it need not wait."""
        # The lease is no longer trusted, so the sender starts no new request.
        for _ in range(int((self.settings.request_timeout + 1) / 0.01)):
            if self.sender.quiet():
                await self._handed([self.keys.lease(self.partition),
                                    self.keys.handed(self.partition)], [self.token])
                return
            await trio.sleep(0.01)

    async def _send(self, delay: float) -> None:
        if delay:
            # The last owner may have had a request in flight: let it land or time out.
            await trio.sleep(delay)
        await self.sender.run()

    async def _redis(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until Redis answers; a lost lease ends the task (``Fenced``)."""
        while True:
            try:
                return await step()
            except Fenced:
                raise
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable; partition waits", partition=self.partition,
                            project=self.keys.project, error=str(exc))
                await trio.sleep(RETRY)

    async def _load_timers(self) -> None:
        timers = await self._redis(lambda: self.inbox.due_timers())
        self.actors.timers.load(list(timers))

    # --- one round -----------------------------------------------------------------------------

    async def _play(self, raw: Sequence[InboxEntry]) -> None:
        entries = [Entry.parse(e.id, e.fields) for e in raw]
        for _ in range(SCHEMA_ATTEMPTS):
            round_ = Round()
            try:
                await self._turns(entries, round_)
                break
            except NeedsSchema as need:
                # Nothing of the round is committed: decide the names in Redis, then
                # replay everything pending from the committed state.
                await self._redis(partial(self.schema.settle, self.client, [need]))
                self.actors = self._actors()
                await self._load_timers()
                pending = await self._redis(lambda: self.inbox.recover(self.token))
                entries = [Entry.parse(e.id, e.fields) for e in pending]
        else:
            raise RuntimeError(f"partition {self.partition} of {self.keys.project!r}: "
                               "the project's schema kept changing under one round")
        if round_.acked or round_.dirty or round_.deleted or round_.commands:
            await self._commit(round_)
        self._trim()

    async def _turns(self, entries: list[Entry], round_: Round) -> None:
        now = self.wall()
        due = self.actors.timers.due(now, READ_COUNT)
        await self._activate({e.key for e in entries} | set(due))
        for count, entry in enumerate(entries, 1):
            try:
                self.actors.apply(entry, round_, now)
            except NeedsSchema:
                raise
            except Exception as exc:
                # An entry no turn can take must not stop its partition for good (every
                # owner would fail on it again): set it aside as a dead letter.
                log.exception("unprocessable entry set aside", partition=self.partition,
                              project=self.keys.project, entry=entry.id)
                round_.refused.append((entry.key, entry.fields.get("b", b""),
                                       "unprocessable", f"{type(exc).__name__}: {exc}"))
                round_.acked.append(entry.id)
            if count % 256 == 0:
                await trio.lowlevel.checkpoint()
        for key in due:
            self.actors.expire(key, now, round_)

    async def _activate(self, keys: set[int]) -> None:
        states = self.actors.states
        wanted = [key for key in keys if key not in states]
        if not wanted:
            return
        found = await self._redis(lambda: self.inbox.load(wanted))
        for key, blob in found.items():
            states[key] = state_decoder.decode(blob)

    async def _commit(self, round_: Round) -> None:
        timeout = self.settings.session_timeout
        now = self.wall()
        states, timers, untimed = {}, {}, []
        for key, blob, deadline in round_.states(timeout):
            states[key] = blob
            if deadline is None:
                untimed.append(key)
            else:
                timers[key] = deadline
        untimed += round_.deleted  # a merged-away customer's timer goes with it
        made = list(outbox.rows_for(round_.commands, 1, now, st.SeqCounter()))
        writes = RoundWrites(
            acks=[a.encode() for a in round_.acked], states=states,
            deleted=sorted(round_.deleted), timers=timers, untimed=untimed,
            outbox=[OutboxEntry(record.lane, record.body, len(row.commands), record.customers,
                                record.first_at) for record, row in made],
            handoffs=[(self.keys.partition(survivor),
                       {b"k": b"%d" % survivor, b"c": b"absorb", b"v": b"%d" % merged,
                        b"s": blob}) for survivor, merged, blob in round_.absorbs],
            dead=[{b"code": code.encode(), b"reason": reason.encode(), b"k": b"%d" % key,
                   b"b": body, b"at": repr(now).encode()}
                  for key, body, code, reason in round_.refused])
        self.round_id += 1
        # The same round id on every attempt: a commit that ran but whose answer was
        # lost comes back DUP, never twice.
        committed = await self._redis(lambda: self.commits.commit(
            self.partition, self.token, self.round_id, writes))
        if committed.outcome is Outcome.FENCED:
            raise Fenced(f"partition {self.partition} of {self.keys.project!r}: lease lost")
        self._count(round_)
        if committed.outcome is Outcome.DUP:
            self.sender.reload()  # the rows are in the stream; their ids are not known here
        else:
            for (_, row), entry_id in zip(made, committed.outbox_ids, strict=True):
                self.sender.offer(OutboxRow(seq_of(entry_id), 0, row.project, row.commands,
                                            row.customers, row.first_at, row.size))
        self.progress.fire()

    def _count(self, round_: Round) -> None:
        metrics = self.metrics
        for kind, count in round_.processed.items():
            metrics.inc("messages_processed_total", count, type=kind)
        if round_.absorbs:
            metrics.inc("customers_merged_total", len(round_.absorbs))
        if round_.refused:
            metrics.inc("dead_letters_total", len(round_.refused), reason="refused")
            for _, _, code, _ in round_.refused:
                metrics.inc("messages_refused_total", reason=code)

    def _trim(self) -> None:
        """Hibernate the oldest customers past this partition's share of the cache; a
        customer whose merge is pending stays (its stash refers to it)."""
        states = self.actors.states
        excess = len(states) - self.cache_size
        if excess > 0:
            waiting = self.actors.waiting
            for key in [k for k in islice(states, excess * 2) if k not in waiting][:excess]:
                del states[key]


class ProjectWorker:
    """This process's share of one project's partitions, a task for each."""

    def __init__(self, client: coredis.Redis[bytes], keys: Keys, settings: WorkerSettings,
                 metrics: Metrics, wall: Callable[[], float], spool: Spool,
                 progress: Broadcast) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.metrics = metrics
        self.wall = wall
        self.spool = spool
        self.progress = progress
        self.leases = Leases(client, keys, ttl=settings.lease_ttl)
        self.schema = SharedSchema(keys, settings.limits)
        self.tasks: dict[int, PartitionTask] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.schema.warm(self.client)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.leases.run)
            task_status.started()
            async for lease in self.leases.gained:
                nursery.start_soon(self._own, lease)

    async def leave(self) -> None:
        """Give every partition up: tasks stop first, leases are released after."""
        await self.leases.leave()

    async def _own(self, lease: Lease) -> None:
        task = PartitionTask(self.client, self.keys, lease, self.schema, self.settings,
                             self.metrics, self.wall, self.spool, self.progress)
        self.tasks[lease.partition] = task
        log.info("partition taken", project=self.keys.project, partition=lease.partition,
                 token=lease.token)
        try:
            async with trio.open_nursery() as nursery:
                async def lost() -> None:
                    await lease.wait_lost()
                    if lease.why in ("rebalance", "stopped"):
                        # Given up, not taken: the lease is still ours in Redis.
                        with trio.move_on_after(self.settings.request_timeout + 1):
                            await task.hand_back()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(lost)
                await task.run()
        except* Fenced as fenced:
            # Out of the task's nurseries, wrapped in groups: a bare ``except Fenced`` let
            # it through and a zombie's first fenced read or commit ended the process.
            log.warning("partition lost", project=self.keys.project,
                        partition=lease.partition, reason=str(fenced.exceptions[0]))
        except* Exception:
            # The other partitions keep running; this one is given back and taken again.
            log.exception("partition task failed", project=self.keys.project,
                          partition=lease.partition)
        finally:
            if self.tasks.get(lease.partition) is task:
                del self.tasks[lease.partition]
            lease.stopped()

    def pending(self) -> int:
        return sum(task.sender.pending for task in self.tasks.values())

    def held(self) -> int:
        return sum(task.actors.held() for task in self.tasks.values())


def active_customers(workers: Sequence[ProjectWorker]) -> int:
    return sum(len(task.actors.states) for w in workers for task in w.tasks.values())


def session_timers(workers: Sequence[ProjectWorker]) -> int:
    return sum(len(task.actors.timers) for w in workers for task in w.tasks.values())

