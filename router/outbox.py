"""The outbox: commands committed with the customer state that produced them, kept until
Infinario's answer for each is final.

One row per round and sender lane. Its body is the lane's commands of that round,
encoded once, in the order the customers produced them; ``done`` marks which of
them are final (answered ``ok`` or dead-lettered) once some but not all are, so
a restart sends again only what was not finished. A row is deleted when its last
command is final: one insert and one delete per row instead of one of each per
command.

Lanes are ``customer % lanes``: a customer's commands always travel in one lane,
in order. A changed lane count re-deals the backlog by customer at start.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import store as st
from .commands import Encoded

_encode = msgspec.json.Encoder().encode
_commands_decoder = msgspec.json.Decoder(list[Encoded])


@dataclass(slots=True, eq=False)
class OutboxRow:
    """One outbox row as the sender holds it while its commands are in play."""

    seq: int
    lane: int
    commands: list[Encoded]
    first_at: float
    size: int  # bytes the row holds in the spool
    final: bytearray = field(default_factory=bytearray)  # 1 per command answered finally
    remaining: int = 0
    attempts: int = 0

    def __post_init__(self) -> None:
        if not self.final:
            self.final = bytearray(len(self.commands))
        self.remaining = self.final.count(0)


def encode_body(commands: Iterable[bytes]) -> bytes:
    """A row's body from its commands' encoded bytes."""
    return b"[" + b",".join(commands) + b"]"


def decode_body(body: bytes) -> list[Encoded]:
    return _commands_decoder.decode(body)


def row_from_db(seq: int, lane: int, body: bytes, done: bytes | None,
                first_at: float) -> OutboxRow:
    commands = decode_body(body)
    final = bytearray(done) if done else bytearray(len(commands))
    return OutboxRow(seq, lane, commands, first_at, len(body), final)


# --- store operations --------------------------------------------------------------------------


def insert(conn: sqlite3.Connection, rows: Sequence[tuple[int, int, bytes, float]]) -> None:
    """``(seq, lane, body, first_at)`` rows, in one statement or a few."""
    st.insert_many(conn, "INSERT INTO outbox(seq, lane, body, first_at)", rows)


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
    if finished:
        st.delete_seqs(conn, "outbox", finished)


def load_lane(conn: sqlite3.Connection, lane: int, after: int,
              limit: int) -> list[tuple[int, int, bytes, bytes | None, float]]:
    return conn.execute(
        "SELECT seq, lane, body, done, first_at FROM outbox WHERE lane = ? AND seq > ? "
        "ORDER BY seq LIMIT ?", (lane, after, limit),
    ).fetchall()


def spool_bytes(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COALESCE(SUM(length(body)), 0) FROM outbox").fetchone()
    return int(row[0])


def deal(commands: Iterable[Encoded], lanes: int) -> dict[int, list[bytes]]:
    """Commands by lane, each lane's in the given order, encoded."""
    by_lane: dict[int, list[bytes]] = {}
    for command in commands:
        by_lane.setdefault(command.customer % lanes, []).append(_encode(command))
    return by_lane


def relane(conn: sqlite3.Connection, lanes: int, now: float) -> None:
    """A changed lane count re-deals the unfinished commands by customer, in order.

    Rows are read in seq order and a customer's commands all sat in one old lane,
    so dealing them again keeps every customer's order.
    """
    previous = st.meta_get(conn, "lanes")
    if previous == str(lanes):
        return
    if previous is not None:
        pending: list[Encoded] = []
        first = now
        for _seq, _lane, body, done, first_at in conn.execute(
            "SELECT seq, lane, body, done, first_at FROM outbox ORDER BY seq"
        ).fetchall():
            first = min(first, first_at)
            commands = decode_body(body)
            pending.extend(c for i, c in enumerate(commands) if not done or not done[i])
        conn.execute("DELETE FROM outbox")
        seq = 1
        rows = []
        for lane, encoded in sorted(deal(pending, lanes).items()):
            for start in range(0, len(encoded), 500):
                rows.append((seq, lane, encode_body(encoded[start:start + 500]), first))
                seq += 1
        insert(conn, rows)
    st.meta_set(conn, "lanes", str(lanes))


def replay_marked(conn: sqlite3.Connection, *, next_seq: int, lanes: int,
                  now: float) -> list[OutboxRow]:
    """Move dead letters marked for replay back into the outbox with fresh retry windows."""
    marked = conn.execute(
        "SELECT id, command FROM dead_letters WHERE replay = 1 AND command IS NOT NULL "
        "ORDER BY id"
    ).fetchall()
    if not marked:
        return []
    by_lane = deal((msgspec.json.decode(body, type=Encoded) for _, body in marked), lanes)
    rows: list[OutboxRow] = []
    records = []
    for lane, encoded in sorted(by_lane.items()):
        body = encode_body(encoded)
        records.append((next_seq, lane, body, now))
        rows.append(OutboxRow(next_seq, lane, decode_body(body), now, len(body)))
        next_seq += 1
    insert(conn, records)
    for part in st.in_chunks([dead_id for dead_id, _ in marked]):
        conn.execute(f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(part))})",
                     part)
    return rows
