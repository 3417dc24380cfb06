"""The outbox: commands committed with the customer state that produced them, kept until
Infinario's answer for each is final.

One row per round, sender lane and project, at most one request's worth of
commands. Its body holds the commands in the configured dialect's wire form,
encoded once, in the order the customers produced them, so a request body is a
join of them. ``done`` marks which of them are final (answered ``ok`` or
dead-lettered) once some but not all are, so a restart sends again only what
was not finished. A row is deleted when its last command is final: one insert
and one delete per row instead of one of each per command.

Lanes are ``customer % lanes``: a customer's commands always travel in one lane,
in order. A changed lane count or dialect rewrites the backlog at start.
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import msgspec

from . import store as st
from .commands import decode_command
from .concat import join_wrapped
from .failpoints import crash_point
from .infinario import MAX_COMMANDS, Dialect

_raw_list = msgspec.json.Decoder(list[msgspec.Raw])


@dataclass(slots=True, eq=False)
class OutboxRow:
    """One outbox row as the sender holds it while its commands are in play."""

    seq: int
    lane: int
    project: str
    commands: list[bytes]  # wire form
    customers: list[int]  # the customer of each command
    first_at: float
    size: int  # bytes the row holds in the spool
    final: bytearray = field(default_factory=bytearray)  # 1 per command answered finally
    remaining: int = 0
    attempts: int = 0

    def __post_init__(self) -> None:
        if not self.final:
            self.final = bytearray(len(self.commands))
        self.remaining = self.final.count(0)


def encode_body(commands: Sequence[bytes]) -> bytes:
    """A row's body from its commands' wire bytes."""
    return join_wrapped(b"[", commands, b"]")


def decode_body(body: bytes) -> list[bytes]:
    return [bytes(raw) for raw in _raw_list.decode(body)]


def pack_customers(customers: Sequence[int]) -> bytes:
    return array("q", customers).tobytes()


def unpack_customers(data: bytes) -> list[int]:
    return array("q", data).tolist()


@dataclass(slots=True)
class Record:
    """A row as written: what ``insert`` takes."""

    seq: int
    lane: int
    project: str
    customers: bytes
    body: bytes
    first_at: float


def rows_for(commands: Sequence[tuple[int, str, bytes]], lanes: int, first_at: float,
             seqs: st.SeqCounter) -> Iterator[tuple[Record, OutboxRow]]:
    """``(customer, project, wire)`` commands dealt into rows by lane and project, in
    order, at most one request's worth per row."""
    groups: dict[tuple[int, str], tuple[list[bytes], list[int]]] = {}
    for customer, project, wire in commands:
        group = groups.get((customer % lanes, project))
        if group is None:
            group = groups[(customer % lanes, project)] = ([], [])
        group[0].append(wire)
        group[1].append(customer)
    for (lane, project), (wires, customers) in groups.items():
        for start in range(0, len(wires), MAX_COMMANDS):
            chunk = wires[start:start + MAX_COMMANDS]
            owners = customers[start:start + MAX_COMMANDS]
            body = encode_body(chunk)
            seq = seqs.take()
            yield (Record(seq, lane, project, pack_customers(owners), body, first_at),
                   OutboxRow(seq, lane, project, chunk, owners, first_at, len(body)))


def row_from_db(seq: int, lane: int, project: str, customers: bytes, body: bytes,
                done: bytes | None, first_at: float) -> OutboxRow:
    commands = decode_body(body)
    final = bytearray(done) if done else bytearray(len(commands))
    return OutboxRow(seq, lane, project, commands, unpack_customers(customers), first_at,
                     len(body), final)


# --- store operations --------------------------------------------------------------------------


def insert(conn: sqlite3.Connection, records: Sequence[Record]) -> None:
    st.insert_many(conn, "INSERT INTO outbox(seq, lane, project, customers, body, first_at)",
                   [(r.seq, r.lane, r.project, r.customers, r.body, r.first_at)
                    for r in records])


def progress(conn: sqlite3.Connection, *, finished: Sequence[int],
             partial: Sequence[tuple[bytes, int]],
             dead: Sequence[tuple[Any, ...]]) -> None:
    """Record answers: delete rows now wholly final, mark the others' final commands, and
    write dead letters ``(created_at, project, customer, command, status, errors,
    attempts, first_at, last_at)``."""
    if dead:
        conn.executemany(
            "INSERT INTO dead_letters(created_at, project, customer, command, origin, status,"
            " errors, attempts, first_at, last_at) VALUES(?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
            dead,
        )
    if partial:
        conn.executemany("UPDATE outbox SET done = ? WHERE seq = ?", partial)
    crash_point("outbox-progress")
    if finished:
        st.delete_seqs(conn, "outbox", finished)


def load_lane(conn: sqlite3.Connection, *, lane: int, after: int,
              limit: int) -> list[OutboxRow]:
    return [row_from_db(*row) for row in conn.execute(
        "SELECT seq, lane, project, customers, body, done, first_at FROM outbox "
        "WHERE lane = ? AND seq > ? ORDER BY seq LIMIT ?", (lane, after, limit),
    ).fetchall()]


class Backlog(Protocol):
    """Where a sender's committed rows wait for Infinario's final answers."""

    async def load_lane(self, lane: int, after: int, limit: int) -> list[OutboxRow]:
        """The lane's rows numbered above ``after``, in order."""
        ...

    async def record(self, finished: Sequence[int], partial: Sequence[tuple[bytes, int]],
                     dead: Sequence[tuple[Any, ...]]) -> None:
        """Answers as ``progress`` takes them; raises ``StorageUnavailable`` when nothing
        was recorded (the sender keeps them and tries again)."""
        ...


class SqliteBacklog:
    """The embedded relay's backlog: the ``outbox`` table, through the store's writer."""

    def __init__(self, store: st.Store) -> None:
        self.store = store

    async def load_lane(self, lane: int, after: int, limit: int) -> list[OutboxRow]:
        return await self.store.call(partial(load_lane, lane=lane, after=after, limit=limit))

    async def record(self, finished: Sequence[int], partial: Sequence[tuple[bytes, int]],
                     dead: Sequence[tuple[Any, ...]]) -> None:
        await self.store.call(
            lambda conn: progress(conn, finished=finished, partial=partial, dead=dead))


def spool_bytes(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COALESCE(SUM(length(body)), 0) FROM outbox").fetchone()
    return int(row[0])


def rewrite(conn: sqlite3.Connection, *, lanes: int, dialect: Dialect, now: float) -> None:
    """At start: re-deal the backlog by customer when the lane count changed, and
    re-encode it when the dialect changed.

    Rows are read in seq order and a customer's commands all sat in one old lane,
    so dealing them again keeps every customer's order.
    """
    previous = (st.meta_get(conn, "lanes"), st.meta_get(conn, "dialect"))
    current = (str(lanes), dialect.name)
    if previous == current:
        return
    old = _dialect_named(previous[1], dialect)
    pending: list[tuple[int, str, bytes]] = []
    first = now
    for row in [row_from_db(*r) for r in conn.execute(
            "SELECT seq, lane, project, customers, body, done, first_at FROM outbox "
            "ORDER BY seq").fetchall()]:
        first = min(first, row.first_at)
        for index, wire in enumerate(row.commands):
            if row.final[index]:
                continue
            if old is not dialect:
                command = old.decode(wire, row.project)
                if not command.timestamp:
                    command.timestamp = row.first_at  # legacy updates carry no time
                wire = dialect.encode(command)
            pending.append((row.customers[index], row.project, wire))
    conn.execute("DELETE FROM outbox")
    insert(conn, [record for record, _ in rows_for(pending, lanes, first, st.SeqCounter())])
    st.meta_set(conn, "lanes", str(lanes))
    st.meta_set(conn, "dialect", dialect.name)


def _dialect_named(name: str | None, current: Dialect) -> Dialect:
    from .infinario import V2, Legacy

    if name is None or name == current.name:
        return current
    return V2({}) if name == "v2" else Legacy()


def marked(conn: sqlite3.Connection) -> list[tuple[int, int, bytes]]:
    """Dead letters marked for replay (``infinario-router dead-letters replay``)."""
    return conn.execute(
        "SELECT id, customer, command FROM dead_letters WHERE replay = 1 "
        "AND command IS NOT NULL ORDER BY id"
    ).fetchall()


def replay_rows(letters: Sequence[tuple[int, int, bytes]], *, lanes: int, dialect: Dialect,
                now: float, seqs: st.SeqCounter) -> list[tuple[Record, OutboxRow]]:
    """Outbox rows for dead letters, with fresh retry windows."""
    commands = []
    for _, customer, body in letters:
        command = decode_command(body)
        commands.append((int(customer), command.project, dialect.encode(command)))
    return list(rows_for(commands, lanes, now, seqs))


def replay(conn: sqlite3.Connection, *, ids: Sequence[int], records: Sequence[Record]) -> bool:
    """Move the dead letters ``ids`` into the outbox as ``records``, all or nothing: False
    when one of them was purged or unmarked meanwhile."""
    still = 0
    for part in st.in_chunks(ids):
        marks = ",".join("?" * len(part))
        still += conn.execute(
            f"SELECT COUNT(*) FROM dead_letters WHERE replay = 1 AND id IN ({marks})",
            part).fetchone()[0]
    if still != len(ids):
        return False
    insert(conn, records)
    for part in st.in_chunks(ids):
        conn.execute(f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(part))})",
                     part)
    return True
