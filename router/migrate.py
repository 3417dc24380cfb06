"""Upgrading a data directory written by schema version 1.

Version 1 kept one journal row, one dedup row and one outbox row per message or
command. ``store.open_database`` renames the old dedup and outbox tables to
``*_v1``; this moves their rows into version 2's tables, in order, when the
relay starts, so an upgrade keeps every acknowledged message, every pending
command and the dedup window.
"""

from __future__ import annotations

import sqlite3

from . import journal, outbox
from . import store as st
from .commands import decode_command
from .infinario import Dialect

CHUNK = 500


def _exists(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                       (table,)).fetchone()
    return row is not None


def migrate_v1(conn: sqlite3.Connection, lanes: int, dialect: Dialect) -> None:
    if not (_exists(conn, "dedup_v1") or _exists(conn, "outbox_v1")):
        return
    # Journal: a version 1 row is one message; version 2 rows hold a request's messages.
    # The whole upgrade is one transaction, so no row is wrapped twice.
    for seq, body in conn.execute("SELECT seq, body FROM journal").fetchall():
        conn.execute("UPDATE journal SET body = ? WHERE seq = ?",
                     (journal.encode_row([bytes(body)]), seq))
    if _exists(conn, "dedup_v1"):
        rows = conn.execute(
            "SELECT write_key, message_id, seen_at FROM dedup_v1 ORDER BY write_key, seen_at"
        ).fetchall()
        next_id = st.max_seq(conn, "dedup") + 1
        by_key: dict[str, list[tuple[str, float]]] = {}
        for write_key, message_id, seen_at in rows:
            by_key.setdefault(write_key, []).append((message_id, seen_at))
        for write_key, seen in by_key.items():
            for start in range(0, len(seen), CHUNK):
                part = seen[start:start + CHUNK]
                conn.execute(
                    "INSERT INTO dedup(id, at, write_key, ids) VALUES(?, ?, ?, ?)",
                    (next_id, max(at for _, at in part), write_key,
                     journal.encode_ids([message_id for message_id, _ in part])))
                next_id += 1
        conn.execute("DROP TABLE dedup_v1")
    if _exists(conn, "outbox_v1"):
        pending = []
        first = None
        for customer, body, first_at in conn.execute(
            "SELECT customer, body, first_at FROM outbox_v1 ORDER BY seq"
        ).fetchall():
            command = decode_command(body)
            pending.append((int(customer), command.project, dialect.encode(command)))
            first = first_at if first is None else min(first, first_at)
        seqs = st.SeqCounter(st.max_seq(conn, "outbox") + 1)
        made = outbox.rows_for(pending, lanes, first or 0.0, seqs)
        outbox.insert(conn, [record for record, _ in made])
        st.meta_set(conn, "lanes", str(lanes))
        st.meta_set(conn, "dialect", dialect.name)
        conn.execute("DROP TABLE outbox_v1")
