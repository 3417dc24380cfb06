"""The directory of per-customer actors: identity, merges, hibernation, session timers.

Customers are virtual actors (activated on their first message, hibernated when
idle, their identity outliving any task). A turn of an actor is the pure
``customer.turn``; the directory runs turns in journal order from one task, which
gives per-customer order and lets a merge combine two customers without locks.
A task per customer would add a context switch per message and buy no
parallelism on trio's single thread.

Hibernation: active customers and the id index live in bounded in-memory caches;
every change is committed to the store with the commands it produced, so an
evicted customer costs nothing but its row. Open sessions keep one entry in a
shared heap of deadlines; when one falls due the directory re-activates the
customer (loading it if needed) and closes the session.
"""

from __future__ import annotations

import heapq
import math
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import msgspec
import structlog
import trio

from . import store as st
from .commands import Command, Encoded, encode_command
from .customer import (
    CHANGES_STATE,
    CustomerState,
    TurnContext,
    close_session,
    end_session,
    merge_into,
    state_decoder,
    state_encoder,
    turn,
)
from .mapping import EventPolicy, LimitExceeded, Limits, Schema
from .metrics import Metrics

log = structlog.get_logger("router.actors")

CHUNK = 1000
_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


@dataclass(slots=True)
class Item:
    """A journaled message on its way to its customer."""

    seq: int
    write_key: str
    message: dict[str, Any]
    body: bytes


@dataclass(slots=True)
class OutboxRow:
    """A command committed to the outbox, handed to the sender."""

    seq: int
    lane: int
    customer: int
    command: Encoded
    body: bytes  # the command's outbox bytes
    first_at: float
    attempts: int = 0
    size: int = 0  # bytes it holds in the spool


def spool_size(body: bytes, origin: bytes | None) -> int:
    """Bytes an outbox row holds in the spool: the command and its origin message."""
    return len(body) + (len(origin) if origin else 0)


class Inbox:
    """Journaled messages waiting for the directory, with room reserved up front.

    Intake reserves room before journaling and hands the messages over after the
    commit, so the queue never holds more than ``capacity`` messages: when the
    directory falls behind, intake waits briefly and then answers 503.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._items: deque[Item] = deque()
        self._room = trio.Event()
        self._ready = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def reserve(self, count: int, wait: float) -> bool:
        count = min(count, self.capacity)
        if self.used + count <= self.capacity:
            self.used += count
            return True
        with trio.move_on_after(wait):
            while self.used + count > self.capacity:
                self._room = trio.Event() if self._room.is_set() else self._room
                await self._room.wait()
            self.used += count
            return True
        return False

    def release(self, count: int) -> None:
        self.used = max(0, self.used - count)
        self._room.set()

    def put(self, items: Iterable[Item]) -> None:
        self._items.extend(items)
        self._ready.set()

    async def get(self, limit: int, deadline: float) -> list[Item]:
        """Up to ``limit`` items; waits until some arrive or trio time ``deadline``."""
        with trio.move_on_at(deadline):
            while not self._items:
                self._ready = trio.Event()
                await self._ready.wait()
        items: list[Item] = []
        while self._items and len(items) < limit:
            items.append(self._items.popleft())
        return items


@dataclass(slots=True)
class _Chunk:
    """Everything one round of turns changed, committed in one transaction."""

    journal_seqs: list[int] = field(default_factory=list)
    dirty: dict[int, CustomerState] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    ids: dict[tuple[str, str], int] = field(default_factory=dict)
    commands: list[tuple[int, Command, bytes | None]] = field(default_factory=list)
    refused: list[tuple[str, int, bytes, str, str]] = field(default_factory=list)
    journal_bytes: int = 0


@dataclass(slots=True, kw_only=True)
class _Prepared:
    """A round's writes, encoded in the trio thread for the writer thread to execute."""

    journal_seqs: list[int]
    customers: list[tuple[int, bytes, float | None]]
    deleted: list[tuple[int]]
    ids: list[tuple[str, str, int]]
    schema: list[tuple[str, str, str, str]]
    commands: list[tuple[int, Encoded, bytes, bytes | None]]
    refused: list[tuple[Any, ...]]
    next_key: int


class Directory:
    """Resolves ids to customers and runs their turns; owns the session timers."""

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
        deliver: Callable[[list[OutboxRow]], None],
        spool: Spool,
        outbox_seq: st.SeqCounter,
        wall: Callable[[], float],
    ) -> None:
        self.store = store
        self.write_keys = write_keys
        self.policy = policy
        self.limits = limits
        self.session_timeout = session_timeout
        self.lanes = lanes
        self.cache_size = active_customers
        self.metrics = metrics
        self.deliver = deliver
        self.spool = spool
        self.wall = wall
        self.schemas: dict[str, Schema] = {}
        self.states: dict[int, CustomerState] = {}
        self.index: dict[tuple[str, str], int] = {}
        self.timers: list[tuple[float, int]] = []
        self.next_key = 1
        self.outbox_seq = outbox_seq
        self.idle = trio.Event()
        self.processing = False  # a round (messages or timers) is between turns and commit
        self.rounds_in_flight = 0
        # At most two rounds commit while the next one's turns run.
        self._rounds_in, self._rounds_out = trio.open_memory_channel[
            tuple[st.Pending[list[OutboxRow]], _Chunk, int]](2)

    # --- startup ---------------------------------------------------------------------------

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
            st.outbox_relane(conn, self.lanes)
            return schema_rows, next_key, timers, st.max_seq(conn, "journal"), st.max_seq(
                conn, "outbox"
            )

        schema_rows, self.next_key, timers, journal_max, outbox_max = await self.store.call(read)
        for project, kind, event_type, key in schema_rows:
            self.schema(project).load(kind, event_type, key)
        self.timers = [(float(deadline), int(key)) for deadline, key in timers]
        heapq.heapify(self.timers)
        self.outbox_seq.next = max(self.outbox_seq.next, outbox_max + 1)
        return int(journal_max)

    def schema(self, project: str) -> Schema:
        schema = self.schemas.get(project)
        if schema is None:
            schema = self.schemas[project] = Schema(self.limits)
        return schema

    # --- the loop --------------------------------------------------------------------------

    async def run(
        self, inbox: Inbox, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        journal_max = await self.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer, inbox)
            task_status.started()
            await self._recover(journal_max)
            while True:
                deadline = self._next_timer()
                items = await inbox.get(CHUNK, deadline)
                if not items and not self._timers_due():
                    continue
                self.processing = True
                try:
                    await self.submit_round(items, reserved=len(items))
                finally:
                    self.processing = False
                if not self.rounds_in_flight:
                    self._set_idle()

    async def _recover(self, journal_max: int) -> None:
        """Messages journaled before a crash go first, in journal order; new ones
        queue in the inbox meanwhile (their seqs are higher)."""
        after = 0
        while True:
            rows = await self.store.call(
                partial(st.journal_load, after=after, upto=journal_max, limit=CHUNK)
            )
            if not rows:
                break
            items = []
            for seq, wk, body in rows:
                try:
                    items.append(Item(seq, wk, _json_decode(body), body))
                except (msgspec.DecodeError, RecursionError) as exc:
                    # Never expected (intake wrote it), but one unreadable row must
                    # not keep the relay from starting: set it aside as a dead letter.
                    log.error("unreadable journal row set aside", seq=seq, error=str(exc))
                    await self.store.call(partial(_set_aside, seq=seq, body=body,
                                                  reason=str(exc), now=self.wall()))
                    self.spool.add(-len(body))
            await self.submit_round(items, reserved=0)
            after = rows[-1][0]
        await self.flush()
        if after:
            log.info("journal recovered", upto=after)

    def _set_idle(self) -> None:
        self.idle.set()
        self.idle = trio.Event()

    def _next_timer(self) -> float:
        if not self.timers:
            return math.inf
        wait = self.timers[0][0] - self.wall()
        return trio.current_time() + max(0.0, wait)

    def _timers_due(self) -> bool:
        return bool(self.timers) and self.timers[0][0] <= self.wall()

    # --- one round -------------------------------------------------------------------------

    async def submit_round(self, items: list[Item], *, reserved: int) -> None:
        """Run the turns and queue their commit; ``_committer`` finishes the round.

        Rounds are pipelined: the next round's turns run while this one commits.
        That is safe because store operations run in submission order (a later
        read sees an earlier write) and everything written is encoded here, from
        the state as this round left it.
        """
        now = self.wall()
        due: list[int] = []
        while self.timers and self.timers[0][0] <= now and len(due) < CHUNK:
            due.append(heapq.heappop(self.timers)[1])
        await self._activate(items, due)
        chunk = _Chunk()
        for item in items:
            chunk.journal_seqs.append(item.seq)
            chunk.journal_bytes += len(item.body)
            self._handle(item, chunk, now)
        for key in due:
            self._expire(key, now, chunk)
        if not chunk.journal_seqs and not chunk.dirty and not chunk.deleted:
            return
        # Inbox room is given back once the round is committed (``_committer``).
        prepared = self._prepare(chunk, now)
        pending = self.store.submit(lambda conn: self._commit(conn, prepared, now))
        self.rounds_in_flight += 1
        await self._rounds_in.send((pending, chunk, reserved))
        self._trim()

    async def flush(self) -> None:
        """Wait until every submitted round has committed and been handed on."""
        while self.rounds_in_flight:
            await self.idle.wait()

    async def _committer(self, inbox: Inbox) -> None:
        async for pending, chunk, count in self._rounds_out:
            rows = await pending.result()
            self.spool.add(sum(row.size for row in rows) - chunk.journal_bytes)
            if chunk.refused:
                self.metrics.inc("dead_letters_total", len(chunk.refused), status="refused")
            self.deliver(rows)
            inbox.release(count)
            self.rounds_in_flight -= 1
            if not self.rounds_in_flight and not self.processing:
                self._set_idle()

    async def _activate(self, items: list[Item], due: list[int]) -> None:
        """Load the customers these items and timers need that are hibernated."""
        wanted_ids: set[tuple[str, str]] = set()
        wanted_keys: set[int] = set()
        for item in items:
            project = self.write_keys.get(item.write_key)
            if project is None:
                continue
            message = item.message
            id_keys = _id_keys(message)
            if message["type"] == "alias":
                # _resolve checks whether previousId is another customer's
                # registered id, so that customer must be in memory too, even
                # when only its index entry is.
                id_keys.append("r:" + message["previousId"])
            for id_key in id_keys:
                pair = (project, id_key)
                key = self.index.get(pair)
                if key is None:
                    wanted_ids.add(pair)
                elif key not in self.states:
                    wanted_keys.add(key)
        for key in due:
            if key not in self.states:
                wanted_keys.add(key)
        if not wanted_ids and not wanted_keys:
            return
        found_ids, states = await self.store.call(
            lambda conn: _lookup(conn, wanted_ids, wanted_keys)
        )
        self.index.update(found_ids)
        for key, blob in states.items():
            self.states[key] = state_decoder.decode(blob)
        self.metrics.inc("customers_activated_total", len(states))

    def _state(self, key: int) -> CustomerState | None:
        state = self.states.get(key)
        if state is None:
            return None
        # Re-insert so dict order approximates least-recently-used for _trim.
        del self.states[key]
        self.states[key] = state
        return state

    def _new_customer(self, project: str, chunk: _Chunk) -> CustomerState:
        state = CustomerState(self.next_key, project)
        self.next_key += 1
        self.states[state.key] = state
        chunk.dirty[state.key] = state
        self.metrics.inc("customers_created_total")
        return state

    def _link(self, project: str, id_key: str, state: CustomerState, chunk: _Chunk) -> None:
        pair = (project, id_key)
        self.index[pair] = state.key
        chunk.ids[pair] = state.key
        # The state gained this id: persist it with the index row even when the
        # turn that follows is refused, or a hibernated copy would lack an id the
        # index gives it (and e.g. take a second registered id).
        chunk.dirty[state.key] = state

    def _handle(self, item: Item, chunk: _Chunk, now: float) -> None:
        message = item.message
        project = self.write_keys.get(item.write_key)
        if project is None:
            # The write key was removed from the configuration since this message
            # was journaled; keep it where an operator can see and replay it.
            chunk.refused.append(
                ("", 0, item.body, "unknown_write_key",
                 f"write key {item.write_key!r} is no longer configured")
            )
            return
        try:
            state = self._resolve(project, message, chunk)
            ctx = TurnContext(project, self.schema(project), self.policy, self.session_timeout,
                              now)
            had_session = state.session_start is not None
            commands = turn(state, message, ctx)
        except LimitExceeded as exc:
            self.metrics.inc("messages_refused_total", code=exc.code)
            log.warning("message refused", code=exc.code, reason=exc.reason,
                        message_id=message.get("messageId"))
            chunk.refused.append((project, 0, item.body, exc.code, exc.reason))
            return
        if ctx.sanitized:
            self.metrics.inc("keys_sanitized_total", ctx.sanitized)
        if ctx.dropped:
            self.metrics.inc("keys_dropped_total", ctx.dropped)
            log.warning("property keys dropped over the project's limit", project=project,
                        count=ctx.dropped, message_id=message.get("messageId"))
        if not had_session and state.session_start is not None:
            deadline = state.deadline(self.session_timeout)
            assert deadline is not None
            heapq.heappush(self.timers, (deadline, state.key))
        if message["type"] in CHANGES_STATE:
            # Other turns only read the record (id changes are marked in
            # _resolve), and rewriting it for every track would double the writes.
            chunk.dirty[state.key] = state
        for command in commands:
            chunk.commands.append((state.key, command, item.body))
        self.metrics.inc("messages_processed_total", type=message["type"])

    def _resolve(self, project: str, message: dict[str, Any], chunk: _Chunk) -> CustomerState:
        """Find (or create, or merge into) the customer this message belongs to."""
        if message["type"] == "alias":
            registered: str | None = message["userId"]
            cookie: str | None = message["previousId"]
        else:
            registered = message.get("userId")
            cookie = message.get("anonymousId")
        by_registered = self._lookup_state(project, "r:", registered)
        by_cookie = self._lookup_state(project, "c:", cookie)

        if message["type"] == "alias" and by_cookie is None and cookie is not None:
            other = self._lookup_state(project, "r:", cookie)
            if other is not None and other is not by_registered:
                raise LimitExceeded(
                    code="alias_registered",
                    reason=f"alias previousId {cookie!r} is another customer's registered id; "
                    "Infinario cannot merge two registered customers",
                )

        if by_registered is None and by_cookie is None:
            state = self._new_customer(project, chunk)
            if registered is not None:
                state.registered = registered
                self._link(project, "r:" + registered, state, chunk)
            if cookie is not None:
                state.cookies.append(cookie)
                self._link(project, "c:" + cookie, state, chunk)
            return state

        if by_cookie is None:
            assert by_registered is not None
            if cookie is not None:
                by_registered.cookies.append(cookie)
                self._link(project, "c:" + cookie, by_registered, chunk)
            return by_registered

        if by_registered is None:
            if registered is None:
                return by_cookie
            if by_cookie.registered is None:
                by_cookie.registered = registered
                self._link(project, "r:" + registered, by_cookie, chunk)
                return by_cookie
            # A shared device: the cookie was last seen with someone else.
            assert cookie is not None
            state = self._new_customer(project, chunk)
            state.registered = registered
            self._link(project, "r:" + registered, state, chunk)
            self._move_cookie(project, cookie, by_cookie, state, chunk)
            return state

        if by_registered is by_cookie:
            return by_registered
        assert cookie is not None
        if by_cookie.registered is None:
            self._merge(project, by_registered, by_cookie, chunk)
        else:
            self._move_cookie(project, cookie, by_cookie, by_registered, chunk)
        return by_registered

    def _lookup_state(self, project: str, prefix: str, value: str | None) -> CustomerState | None:
        if value is None:
            return None
        key = self.index.get((project, prefix + value))
        if key is None:
            return None
        state = self._state(key)
        if state is None:
            raise RuntimeError(f"customer {key} was not activated before its turn")
        return state

    def _move_cookie(
        self,
        project: str,
        cookie: str,
        source: CustomerState,
        target: CustomerState,
        chunk: _Chunk,
    ) -> None:
        if cookie in source.cookies:
            source.cookies.remove(cookie)
        chunk.dirty[source.key] = source
        if cookie not in target.cookies:
            target.cookies.append(cookie)
        self._link(project, "c:" + cookie, target, chunk)
        self.metrics.inc("cookies_moved_total")

    def _merge(
        self, project: str, survivor: CustomerState, merged: CustomerState, chunk: _Chunk
    ) -> None:
        had_session = survivor.session_start is not None
        merge_into(survivor, merged)
        for cookie in merged.cookies:
            self._link(project, "c:" + cookie, survivor, chunk)
        if merged.registered is not None:
            self._link(project, "r:" + merged.registered, survivor, chunk)
        self.states.pop(merged.key, None)
        chunk.dirty.pop(merged.key, None)
        chunk.deleted.add(merged.key)
        chunk.dirty[survivor.key] = survivor
        if not had_session and survivor.session_start is not None:
            deadline = survivor.deadline(self.session_timeout)
            assert deadline is not None
            heapq.heappush(self.timers, (deadline, survivor.key))
        self.metrics.inc("customers_merged_total")

    def _expire(self, key: int, now: float, chunk: _Chunk) -> None:
        """A session deadline fell due: close it, or re-arm if activity moved it."""
        state = self._state(key)
        if state is None:
            return  # merged away; the survivor has its own timer
        deadline = state.deadline(self.session_timeout)
        if deadline is None:
            return
        if deadline > now:
            heapq.heappush(self.timers, (deadline, key))
            return
        ctx = TurnContext(state.project, self.schema(state.project), self.policy,
                          self.session_timeout, now)
        chunk.dirty[key] = state
        try:
            command = end_session(state, ctx)
        except LimitExceeded as exc:
            # session_end is a new event type the project has no room for. The
            # session still ends (or its timer would fire forever), unreported;
            # raising here would stop the directory for every customer.
            close_session(state)
            self.metrics.inc("messages_refused_total", code=exc.code)
            log.warning("session_end refused", code=exc.code, reason=exc.reason,
                        project=state.project, customer=key)
            return
        chunk.commands.append((key, command, None))
        self.metrics.inc("sessions_ended_total")

    def _prepare(self, chunk: _Chunk, now: float) -> _Prepared:
        """Encode everything the round wrote, here in the trio thread, as it is now."""
        timeout = self.session_timeout
        commands = []
        for customer, command, origin in chunk.commands:
            encoded, body = encode_command(command)
            commands.append((customer, encoded, body, origin))
        refused = [
            (now, project, customer, origin, _json_encode([f"{code}: {reason}"]).decode(),
             now, now)
            for project, customer, origin, code, reason in chunk.refused
        ]
        return _Prepared(
            journal_seqs=chunk.journal_seqs,
            customers=[(key, state_encoder.encode(state), state.deadline(timeout))
                       for key, state in chunk.dirty.items()],
            deleted=[(key,) for key in chunk.deleted],
            ids=[(project, id_key, key) for (project, id_key), key in chunk.ids.items()],
            schema=[(project, kind, event_type, key)
                    for project, schema in self.schemas.items()
                    for kind, event_type, key in schema.drain_new()],
            commands=commands,
            refused=refused,
            next_key=self.next_key,
        )

    def _commit(self, conn: sqlite3.Connection, prep: _Prepared, now: float) -> list[OutboxRow]:
        """One transaction: retire the journal rows and record everything they caused.

        Runs in the store's writer thread: it only executes SQL and numbers the
        outbox rows (the outbox sequence is advanced only here, in order).
        """
        if prep.journal_seqs:
            st.delete_seqs(conn, "journal", prep.journal_seqs)
        st.insert_many(conn, "INSERT OR REPLACE INTO customers(key, state, deadline)",
                       prep.customers)
        if prep.deleted:
            conn.executemany("DELETE FROM customers WHERE key = ?", prep.deleted)
        st.insert_many(conn, "INSERT OR REPLACE INTO ids(project, id, customer)", prep.ids)
        st.insert_many(conn, "INSERT OR IGNORE INTO schema(project, kind, event_type, key)",
                       prep.schema)
        rows: list[OutboxRow] = []
        records = []
        seq = self.outbox_seq.next
        lanes = self.lanes
        for customer, command, body, origin in prep.commands:
            lane = customer % lanes
            records.append((seq, lane, customer, body, origin, now))
            rows.append(OutboxRow(seq, lane, customer, command, body, now,
                                  size=spool_size(body, origin)))
            seq += 1
        st.insert_many(conn, "INSERT INTO outbox(seq, lane, customer, body, origin, first_at)",
                       records)
        self.outbox_seq.next = seq
        if prep.refused:
            conn.executemany(
                "INSERT INTO dead_letters(created_at, project, customer, command, origin, status,"
                " errors, attempts, first_at, last_at) VALUES(?, ?, ?, NULL, ?, 'refused', ?, 0,"
                " ?, ?)",
                prep.refused,
            )
        st.meta_set(conn, "next_customer", str(prep.next_key))
        return rows

    def _trim(self) -> None:
        """Hibernate the least recently used customers past the cache size."""
        excess = len(self.states) - self.cache_size
        if excess > 0:
            for key in list(islice(self.states, excess)):
                del self.states[key]
            self.metrics.inc("customers_hibernated_total", excess)
        excess = len(self.index) - 2 * self.cache_size
        if excess > 0:
            for pair in list(islice(self.index, excess)):
                del self.index[pair]


class Spool:
    """Bytes of journal and outbox on disk not yet finished; intake refuses past the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.bytes = 0

    def add(self, count: int) -> None:
        self.bytes += count

    @property
    def full(self) -> bool:
        return self.bytes >= self.cap


def _id_keys(message: dict[str, Any]) -> list[str]:
    if message["type"] == "alias":
        return ["r:" + message["userId"], "c:" + message["previousId"]]
    keys = []
    user = message.get("userId")
    if user is not None:
        keys.append("r:" + user)
    anon = message.get("anonymousId")
    if anon is not None:
        keys.append("c:" + anon)
    return keys


def _lookup(
    conn: sqlite3.Connection, pairs: set[tuple[str, str]], keys: set[int]
) -> tuple[dict[tuple[str, str], int], dict[int, bytes]]:
    found: dict[tuple[str, str], int] = {}
    by_project: dict[str, list[str]] = {}
    for project, id_key in pairs:
        by_project.setdefault(project, []).append(id_key)
    for project, id_keys in by_project.items():
        for start in range(0, len(id_keys), 500):
            part = id_keys[start : start + 500]
            marks = ",".join("?" * len(part))
            for id_key, customer in conn.execute(
                f"SELECT id, customer FROM ids WHERE project = ? AND id IN ({marks})",
                (project, *part),
            ):
                found[(project, id_key)] = int(customer)
    keys = set(keys) | set(found.values())
    states: dict[int, bytes] = {}
    key_list = list(keys)
    for start in range(0, len(key_list), 500):
        part_keys = key_list[start : start + 500]
        marks = ",".join("?" * len(part_keys))
        for key, blob in conn.execute(
            f"SELECT key, state FROM customers WHERE key IN ({marks})", part_keys
        ):
            states[int(key)] = blob
    return found, states


def _set_aside(conn: sqlite3.Connection, *, seq: int, body: bytes, reason: str,
               now: float) -> None:
    conn.execute(
        "INSERT INTO dead_letters(created_at, project, customer, command, origin, status, errors,"
        " attempts, first_at, last_at) VALUES(?, '', 0, NULL, ?, 'unreadable', ?, 0, ?, ?)",
        (now, body, _json_encode([f"journal row {seq}: {reason}"]).decode(), now, now),
    )
    conn.execute("DELETE FROM journal WHERE seq = ?", (seq,))
