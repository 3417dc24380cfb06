"""The customers stage: per-customer actors owned by one partition task.

Customers are virtual actors (activated on their first message, hibernated when
idle, their identity outliving any task). The partition task owns them: it takes
journaled requests from a bounded memory channel, resolves each message's
customer (``identity.py``), runs the customer's turn (the pure ``customer.turn``)
in journal order, keeps the open sessions' deadlines (``SessionTimers``) and
commits each round in one transaction: the journal rows' retirement, the
customers' new state and the commands they produced (the outbox). It then hands
each sender lane its row.

One task owns every customer of the embedded relay: a task per customer would
cost memory per idle customer and a context switch per message, and buy no
parallelism on trio's single thread; a merge of two customers needs no
hand-off when one owner holds both.

Hibernation: active customers and the id index are bounded caches; every change
is committed with the commands it produced, so an evicted customer costs nothing
but its row.
"""

from __future__ import annotations

import heapq
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import msgspec
import structlog
import trio

from . import journal, outbox
from . import store as st
from .admission import Admission
from .broadcast import Broadcast
from .commands import Command
from .customer import (
    CHANGES_STATE,
    CustomerState,
    TurnContext,
    session_due,
    state_decoder,
    state_encoder,
    turn,
)
from .failpoints import crash_point
from .identity import Changes, Identity, NotActive, lookup_keys
from .journal import Journaled
from .mapping import EventPolicy, ExtrasCache, LimitExceeded, Limits, Schema
from .metrics import Metrics
from .outbox import OutboxRow
from .segment import message_json
from .spool import Spool

log = structlog.get_logger("router.partition")

ROUND_MESSAGES = 1000  # a round takes whole requests until it holds this many messages
SLICE = 256  # messages turned between checkpoints: no round stalls the event loop for long
RECOVER_ROWS = 64
_json_encode = msgspec.json.Encoder().encode
_NO_CONTEXTS: tuple[int | None, ...] = ()
# What a round leaves in a request's place for each message it has turned.
_TURNED: dict[str, Any] = {}


class SessionTimers:
    """Open sessions' deadlines (wall time) in one heap; stale entries are skipped when due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[tuple[float, int]]:
        return iter(sorted(self._heap))

    def load(self, entries: list[tuple[float, int]]) -> None:
        self._heap = entries
        heapq.heapify(self._heap)

    def arm(self, deadline: float, key: int) -> None:
        heapq.heappush(self._heap, (deadline, key))

    def next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def due(self, now: float, limit: int) -> list[int]:
        keys: list[int] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(keys) < limit:
            keys.append(heapq.heappop(heap)[1])
        return keys


@dataclass(slots=True)
class Round:
    """Everything one round of turns changed, committed in one transaction."""

    changes: Changes = field(default_factory=Changes)
    journal_seqs: list[int] = field(default_factory=list)
    journal_bytes: int = 0
    messages: int = 0
    commands: list[tuple[int, str, bytes]] = field(default_factory=list)  # customer, project, wire
    refused: list[tuple[str, int, bytes, str, str]] = field(default_factory=list)
    processed: dict[str, int] = field(default_factory=dict)  # messages by type
    # One turn context per project for the whole round: building one per message
    # cost as much as some turns. Their counts of sanitized and dropped keys add up
    # over the round and are counted once (``_count``).
    turns: dict[str, TurnContext] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class _Prepared:
    """A round's writes, encoded in the trio thread for the writer thread to execute."""

    journal_seqs: list[int]
    customers: list[tuple[int, bytes, float | None]]
    deleted: list[tuple[int]]
    ids: list[tuple[str, str, int]]
    unlinked: list[tuple[str, str]]
    schema: list[tuple[str, str, str, str]]
    rows: list[outbox.Record]
    refused: list[tuple[Any, ...]]
    next_key: int


class Partition:
    """Owns every customer: identity, state, session timers; runs their turns in rounds."""

    def __init__(
        self,
        *,
        store: st.Store,
        write_keys: dict[str, str],
        policy: EventPolicy,
        limits: Limits,
        session_timeout: float,
        lanes: int,
        active_customers: int,
        metrics: Metrics,
        offer: Callable[[OutboxRow], None],
        spool: Spool,
        admission: Admission,
        outbox_seq: st.SeqCounter,
        wall: Callable[[], float],
        encode: Callable[[Command], bytes],
        changed: Broadcast | None = None,
    ) -> None:
        self.store = store
        self.write_keys = write_keys
        self.policy = policy
        self.limits = limits
        self.session_timeout = session_timeout
        self.lanes = lanes
        self.cache_size = active_customers
        self.metrics = metrics
        self.offer = offer
        self.spool = spool
        self.admission = admission
        self.outbox_seq = outbox_seq
        self.wall = wall
        self.encode = encode  # a command's wire form, in the configured dialect
        self.identity = Identity(cached=True)
        self.extras = ExtrasCache()
        self.schemas: dict[str, Schema] = {}
        self.states: dict[int, CustomerState] = {}
        self.timers = SessionTimers()
        self.next_key = 1
        self.busy = False  # a round is between its first turn and its hand-off
        self.changed = changed or Broadcast()  # fired when a round ends or commits
        self.finished = trio.Event()  # run() has ended: its channel closed, rounds committed
        self.rounds_in_flight = 0
        self._chain = st.Chain()  # rounds commit in the order they were played
        # At most two rounds commit while the next one's turns run.
        self._rounds_in, self._rounds_out = trio.open_memory_channel[
            tuple[st.Pending[None], Round, list[OutboxRow]]](2)

    @property
    def index(self) -> dict[tuple[str, str], int]:
        return self.identity.index

    def idle(self) -> bool:
        return not self.busy and not self.rounds_in_flight

    # --- the customers the identity rules read and create ---------------------------------------

    def get(self, key: int) -> CustomerState | None:
        state = self.states.get(key)
        if state is not None:
            # Re-insert so dict order approximates least-recently-used for _trim.
            del self.states[key]
            self.states[key] = state
        return state

    def create(self, project: str) -> CustomerState:
        state = CustomerState(self.next_key, project)
        self.next_key += 1
        self.states[state.key] = state
        return state

    def drop(self, key: int) -> None:
        self.states.pop(key, None)

    def schema(self, project: str) -> Schema:
        schema = self.schemas.get(project)
        if schema is None:
            schema = self.schemas[project] = Schema(self.limits)
        return schema

    # --- startup ---------------------------------------------------------------------------------

    async def load(self) -> int:
        """Restore schemas, counters and session timers; return the journal's last seq."""

        def read(conn: sqlite3.Connection) -> tuple[Any, ...]:
            schema_rows = conn.execute(
                "SELECT project, kind, event_type, key FROM schema"
            ).fetchall()
            next_key = int(st.meta_get(conn, "next_customer", "1") or 1)
            next_key = max(
                next_key,
                1 + int(conn.execute("SELECT COALESCE(MAX(key), 0) FROM customers").fetchone()[0]),
            )
            timers = conn.execute(
                "SELECT deadline, key FROM customers WHERE deadline IS NOT NULL"
            ).fetchall()
            return schema_rows, next_key, timers, st.max_seq(conn, "journal")

        schema_rows, self.next_key, timers, journal_max = await self.store.call(read)
        for project, kind, event_type, key in schema_rows:
            self.schema(project).load(kind, event_type, key)
        self.timers.load([(float(deadline), int(key)) for deadline, key in timers])
        return int(journal_max)

    # --- the loop --------------------------------------------------------------------------------

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Journaled], *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await self._run(inbox, task_status)
        finally:
            self.finished.set()

    async def _run(self, inbox: trio.MemoryReceiveChannel[Journaled],
                   task_status: trio.TaskStatus[None]) -> None:
        journal_max = await self.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer)
            task_status.started()
            await self._recover(journal_max)
            async with inbox:
                while True:
                    batches: list[Journaled] = []
                    with trio.move_on_at(self._next_timer()):
                        try:
                            batches.append(await inbox.receive())
                        except trio.EndOfChannel:
                            break
                    count = sum(len(b.messages) for b in batches)
                    while count < ROUND_MESSAGES:
                        try:
                            batch = inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        batches.append(batch)
                        count += len(batch.messages)
                    if batches or self._timers_due():
                        await self.play(batches)
            await self.flush()
            nursery.cancel_scope.cancel()

    async def _recover(self, journal_max: int) -> None:
        """Requests journaled before a crash go first, in journal order; new ones wait in
        the channel meanwhile (their seqs are higher)."""
        after = 0
        while True:
            rows = await self.store.call(
                partial(journal.load_rows, after=after, upto=journal_max, limit=RECOVER_ROWS))
            if not rows:
                break
            batches = []
            for seq, write_key, body in rows:
                try:
                    messages = journal.decode_row(body)
                except Exception as exc:
                    # Never expected (intake wrote it), but one unreadable row must
                    # not keep the relay from starting: set it aside as a dead letter.
                    log.error("unreadable journal row set aside", seq=seq, error=str(exc))
                    self.metrics.inc("dead_letters_total", reason="unreadable")
                    await self.store.call(partial(journal.set_aside, seq=seq, body=body,
                                                  reason=str(exc), now=self.wall()))
                    self.spool.add(-len(body))
                    continue
                batches.append(Journaled(seq, write_key, messages, len(body)))
            await self.play(batches, admitted=False)
            after = rows[-1][0]
        await self.flush()
        if after:
            log.info("journal recovered", upto=after)

    def _next_timer(self) -> float:
        deadline = self.timers.next_deadline()
        if deadline == math.inf:
            return math.inf
        return trio.current_time() + max(0.0, deadline - self.wall())

    def _timers_due(self) -> bool:
        return self.timers.next_deadline() <= self.wall()

    # --- one round -------------------------------------------------------------------------------

    async def play(self, batches: list[Journaled], *, admitted: bool = True) -> None:
        """Run the turns and queue their commit; ``_committer`` finishes the round.

        Rounds are pipelined: the next round's turns run while this one commits.
        That is safe because store operations run in submission order (a later
        read sees an earlier write) and everything written is encoded here, from
        the state as this round left it.
        """
        self.busy = True
        try:
            now = self.wall()
            due = self.timers.due(now, ROUND_MESSAGES)
            round_ = Round()
            # Ids found nowhere are new for this round only: once it commits, the
            # store has whatever it made of them.
            self.identity.absent.clear()
            await self._activate(round_, (), due)
            turned = 0
            for position, batch in enumerate(batches):
                round_.journal_seqs.append(batch.seq)
                round_.journal_bytes += batch.size
                if admitted:
                    round_.messages += len(batch.messages)
                project = self.write_keys.get(batch.write_key)
                contexts = batch.contexts or _NO_CONTEXTS
                messages = batch.messages
                for index, message in enumerate(messages):
                    context_key = contexts[index] if contexts else None
                    try:
                        self._handle(batch.write_key, project, message, round_, now,
                                     context_key)
                    except NotActive:
                        # Most rounds find every customer in memory and read
                        # nothing. The first call that does not loads what the
                        # rest of the round needs, in one read.
                        await self._activate(round_, self._rest(batches, position, index), ())
                        self._handle(batch.write_key, project, message, round_, now,
                                     context_key)
                    turned += 1
                    # Dropped once turned: its objects are freed now, while still in
                    # the CPU's caches, not all together when the round is over.
                    messages[index] = _TURNED
                    if turned % SLICE == 0:
                        await trio.lowlevel.checkpoint()
            for key in due:
                self._expire(key, now, round_)
            changes = round_.changes
            if not round_.journal_seqs and not changes.dirty and not changes.deleted:
                return
            prepared, rows = self._prepare(round_, now)
            pending = self.store.submit(partial(_commit, prepared=prepared), chain=self._chain)
            self.rounds_in_flight += 1
            self._count(round_)
            await self._rounds_in.send((pending, round_, rows))
            self._trim()
        finally:
            self.busy = False
            self.changed.fire()

    async def flush(self) -> None:
        """Wait until every submitted round has committed and been handed on."""
        while self.rounds_in_flight:
            await self.changed.wait()

    async def _committer(self) -> None:
        async for pending, round_, rows in self._rounds_out:
            try:
                # A full disk keeps the round here (its journal rows are still on
                # disk) and tries again; later rounds wait their turn.
                await self.store.settle(pending)
            finally:
                self.rounds_in_flight -= 1
            self.spool.add(sum(row.size for row in rows) - round_.journal_bytes)
            for row in rows:
                self.offer(row)
            self.admission.release(round_.messages)
            self.changed.fire()

    def _rest(self, batches: list[Journaled], position: int,
              index: int) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """Each call of the round from ``batches[position].messages[index]`` on, with
        its project."""
        for at in range(position, len(batches)):
            batch = batches[at]
            project = self.write_keys.get(batch.write_key)
            for message in batch.messages[index if at == position else 0:]:
                yield project, message

    async def _activate(self, round_: Round,
                        calls: Iterable[tuple[str | None, dict[str, Any]]],
                        due: Sequence[int]) -> None:
        """Read the ids and hibernated customers ``calls`` and the due timers need.

        What this round already did stays as it is: an id it unlinked is new
        (the store still has the old row), and a customer in memory, changed or
        not, is not read back over.
        """
        changed_ids = round_.changes.ids
        absent = self.identity.absent
        index = self.identity.index
        states = self.states
        wanted_ids: set[tuple[str, str]] = set()
        wanted_keys: set[int] = set()
        for project, message in calls:
            if project is None:
                continue
            for id_key in lookup_keys(message):
                pair = (project, id_key)
                key = index.get(pair)
                if key is None:
                    if pair in changed_ids:
                        absent.add(pair)
                    elif pair not in absent:
                        wanted_ids.add(pair)
                elif key not in states:
                    wanted_keys.add(key)
        wanted_keys.update(key for key in due if key not in states)
        if not wanted_ids and not wanted_keys:
            return
        found_ids, blobs = await self.store.call(
            partial(_lookup, pairs=wanted_ids, keys=wanted_keys))
        index.update(found_ids)
        absent.update(wanted_ids.difference(found_ids))
        loaded = 0
        for key, blob in blobs.items():
            if key not in states:
                states[key] = state_decoder.decode(blob)
                loaded += 1
        self.metrics.inc("customers_activated_total", loaded)

    def _arm(self, state: CustomerState, had_session: bool) -> None:
        if not had_session and state.session_start is not None:
            deadline = state.deadline(self.session_timeout)
            assert deadline is not None
            self.timers.arm(deadline, state.key)

    def _handle(self, write_key: str, project: str | None, message: dict[str, Any],
                round_: Round, now: float, context_key: int | None = None) -> None:
        if project is None:
            # The write key was removed from the configuration since this message
            # was journaled; keep it where an operator can see and replay it.
            round_.refused.append(("", 0, message_json(message), "unknown_write_key",
                                   f"write key {write_key!r} is no longer configured"))
            return
        changes = round_.changes
        ctx = round_.turns.get(project)
        if ctx is None:
            ctx = round_.turns[project] = TurnContext(
                project, self.schema(project), self.policy, self.session_timeout, now,
                self.extras)
        ctx.context_key = context_key
        sanitized, dropped = ctx.sanitized, ctx.dropped
        try:
            state = self.identity.resolve(project, message, self, changes, self._arm)
            had_session = state.session_start is not None
            commands = turn(state, message, ctx)
        except LimitExceeded as exc:
            # A refused message changed nothing, so it counts no keys either.
            ctx.sanitized, ctx.dropped = sanitized, dropped
            self.metrics.inc("messages_refused_total", reason=exc.code)
            log.warning("message refused", code=exc.code, reason=exc.reason,
                        message_id=message.get("messageId"))
            round_.refused.append((project, 0, message_json(message), exc.code, exc.reason))
            return
        if ctx.dropped != dropped:
            log.warning("property keys dropped over the project's limit", project=project,
                        count=ctx.dropped - dropped, message_id=message.get("messageId"))
        self._arm(state, had_session)
        if message["type"] in CHANGES_STATE:
            # Other turns only read the record (id changes are marked by identity),
            # and rewriting it for every track would double the writes.
            changes.dirty[state.key] = state
        key = state.key
        encode = self.encode
        append = round_.commands.append
        for command in commands:
            append((key, project, encode(command)))
        processed = round_.processed
        kind = message["type"]
        processed[kind] = processed.get(kind, 0) + 1

    def _expire(self, key: int, now: float, round_: Round) -> None:
        """A session deadline fell due: close it, or re-arm if activity moved it."""
        state = self.states.get(key)
        if state is None:
            return  # merged away; the survivor has its own timer
        ctx = TurnContext(state.project, self.schema(state.project), self.policy,
                          self.session_timeout, now)
        try:
            due = session_due(state, ctx)
        except LimitExceeded as exc:
            # session_end is a new event type the project has no room for: the
            # session ended unreported; raising would stop every customer's turns.
            round_.changes.dirty[key] = state
            self.metrics.inc("messages_refused_total", reason=exc.code)
            log.warning("session_end refused", code=exc.code, reason=exc.reason,
                        customer=key)
            return
        if isinstance(due, float):
            self.timers.arm(due, key)
        elif due is not None:
            round_.changes.dirty[key] = state
            round_.commands.append((key, state.project, self.encode(due)))
            self.metrics.inc("sessions_ended_total")

    def _count(self, round_: Round) -> None:
        """Count a round's work once per round: a counter update per message cost
        as much as some of the turns."""
        changes = round_.changes
        metrics = self.metrics
        for kind, count in round_.processed.items():
            metrics.inc("messages_processed_total", count, type=kind)
        for ctx in round_.turns.values():
            if ctx.sanitized:
                metrics.inc("keys_sanitized_total", ctx.sanitized)
            if ctx.dropped:
                metrics.inc("keys_dropped_total", ctx.dropped)
        if changes.created:
            metrics.inc("customers_created_total", changes.created)
        if changes.merged:
            metrics.inc("customers_merged_total", changes.merged)
        if changes.cookies_moved:
            metrics.inc("cookies_moved_total", changes.cookies_moved)
        if changes.cookies_dropped:
            metrics.inc("cookies_dropped_total", changes.cookies_dropped)
        if round_.refused:
            metrics.inc("dead_letters_total", len(round_.refused), reason="refused")

    def _prepare(self, round_: Round, now: float) -> tuple[_Prepared, list[OutboxRow]]:
        """Encode everything the round wrote, here in the trio thread, as it is now."""
        timeout = self.session_timeout
        changes = round_.changes
        made = list(outbox.rows_for(round_.commands, self.lanes, now, self.outbox_seq))
        refused = [
            (now, project, customer, origin, _json_encode([f"{code}: {reason}"]).decode(),
             now, now)
            for project, customer, origin, code, reason in round_.refused
        ]
        prepared = _Prepared(
            journal_seqs=round_.journal_seqs,
            customers=[(key, state_encoder.encode(state), state.deadline(timeout))
                       for key, state in changes.dirty.items()],
            deleted=[(key,) for key in changes.deleted],
            ids=[(project, id_key, key) for (project, id_key), key in changes.ids.items()
                 if key is not None],
            unlinked=[pair for pair, key in changes.ids.items() if key is None],
            schema=[(project, kind, event_type, key)
                    for project, schema in self.schemas.items()
                    for kind, event_type, key in schema.drain_new()],
            rows=[record for record, _ in made],
            refused=refused,
            next_key=self.next_key,
        )
        return prepared, [row for _, row in made]

    def _trim(self) -> None:
        """Hibernate the least recently used customers past the cache size."""
        excess = len(self.states) - self.cache_size
        if excess > 0:
            for key in list(islice(self.states, excess)):
                del self.states[key]
            self.metrics.inc("customers_hibernated_total", excess)
        self.identity.forget(len(self.identity.index) - 2 * self.cache_size)


def _commit(conn: sqlite3.Connection, *, prepared: _Prepared) -> None:
    """One transaction: retire the journal rows and record everything they caused."""
    prep = prepared
    if prep.journal_seqs:
        st.delete_seqs(conn, "journal", prep.journal_seqs)
    st.insert_many(conn, "INSERT OR REPLACE INTO customers(key, state, deadline)",
                   prep.customers)
    if prep.deleted:
        conn.executemany("DELETE FROM customers WHERE key = ?", prep.deleted)
    st.insert_many(conn, "INSERT OR REPLACE INTO ids(project, id, customer)", prep.ids)
    if prep.unlinked:
        conn.executemany("DELETE FROM ids WHERE project = ? AND id = ?", prep.unlinked)
    st.insert_many(conn, "INSERT OR IGNORE INTO schema(project, kind, event_type, key)",
                   prep.schema)
    crash_point("round-commit")
    outbox.insert(conn, prep.rows)
    if prep.refused:
        conn.executemany(
            "INSERT INTO dead_letters(created_at, project, customer, command, origin, status,"
            " errors, attempts, first_at, last_at) VALUES(?, ?, ?, NULL, ?, 'refused', ?, 0,"
            " ?, ?)",
            prep.refused,
        )
    st.meta_set(conn, "next_customer", str(prep.next_key))


def _lookup(
    conn: sqlite3.Connection, *, pairs: set[tuple[str, str]], keys: set[int]
) -> tuple[dict[tuple[str, str], int], dict[int, bytes]]:
    found: dict[tuple[str, str], int] = {}
    by_project: dict[str, list[str]] = {}
    for project, id_key in pairs:
        by_project.setdefault(project, []).append(id_key)
    for project, id_keys in by_project.items():
        for part in st.in_chunks(id_keys):
            marks = ",".join("?" * len(part))
            for id_key, customer in conn.execute(
                f"SELECT id, customer FROM ids WHERE project = ? AND id IN ({marks})",
                (project, *part),
            ):
                found[(project, id_key)] = int(customer)
    wanted = list(set(keys) | set(found.values()))
    states: dict[int, bytes] = {}
    for part_keys in st.in_chunks(wanted):
        marks = ",".join("?" * len(part_keys))
        for key, blob in conn.execute(
            f"SELECT key, state FROM customers WHERE key IN ({marks})", list(part_keys)
        ):
            states[int(key)] = blob
    return found, states
