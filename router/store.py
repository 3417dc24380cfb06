"""SQLite state and journal (WAL) in the data directory, behind one writer thread.

All reads and writes go through a single connection driven by one writer task:
callers ``await store.call(fn)`` and every operation queued while the previous
transaction was running is executed in the next one, so concurrent requests
share one commit (group commit) and durability costs one fsync per round, not
one per request. One failing operation does not undo its neighbours: the round
is rolled back and its operations run again one transaction each.

Tables:
    journal        accepted Segment messages not yet turned into commands
    dedup          (write key, messageId) seen within the dedup window
    outbox         Infinario commands not yet answered finally, with their origin
    customers      hibernated customer state, with the open session's deadline
    ids            (project, id) -> customer
    schema         event types and property keys Infinario already knows, per project
    dead_letters   commands Infinario refused or that ran out of retries
    meta           small counters
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from .errors import StartupError

T = TypeVar("T")

DB_NAME = "router.db"
WAL_CHECKPOINT_PAGES = 10_000
LOCK_NAME = "router.lock"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal(
    seq INTEGER PRIMARY KEY, write_key TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dedup(
    write_key TEXT NOT NULL, message_id TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY(write_key, message_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_seen ON dedup(seen_at);
CREATE TABLE IF NOT EXISTS outbox(
    seq INTEGER PRIMARY KEY, lane INTEGER NOT NULL, customer INTEGER NOT NULL,
    body BLOB NOT NULL, origin BLOB, first_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_lane ON outbox(lane, seq);
CREATE TABLE IF NOT EXISTS customers(
    key INTEGER PRIMARY KEY, state BLOB NOT NULL, deadline REAL);
CREATE INDEX IF NOT EXISTS customers_deadline ON customers(deadline)
    WHERE deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS ids(
    project TEXT NOT NULL, id TEXT NOT NULL, customer INTEGER NOT NULL,
    PRIMARY KEY(project, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schema(
    project TEXT NOT NULL, kind TEXT NOT NULL, event_type TEXT NOT NULL, key TEXT NOT NULL,
    PRIMARY KEY(project, kind, event_type, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters(
    id INTEGER PRIMARY KEY, created_at REAL NOT NULL, project TEXT NOT NULL,
    customer INTEGER NOT NULL, command BLOB, origin BLOB, status TEXT NOT NULL,
    errors TEXT NOT NULL, attempts INTEGER NOT NULL, first_at REAL NOT NULL,
    last_at REAL NOT NULL, replay INTEGER NOT NULL DEFAULT 0);
"""


def open_connection(path: Path, *, timeout: float = 5.0) -> sqlite3.Connection:
    conn = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=timeout
    )
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before intake answers 200, even across power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    # 16 MiB: the page cache counts against RSS, and a backlog must not grow it much.
    conn.execute("PRAGMA cache_size=-16384")
    # Journal and outbox rows live for seconds: a 40 MiB WAL (default 4 MiB)
    # lets their pages be reused several times between checkpoints, which cut
    # the bytes written per message by about 30%.
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    return conn


class DataDir:
    """The data directory: created if missing, locked against a second instance."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def prepare(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"data dir {str(self.path)!r} cannot be created: {exc.strerror}"
            ) from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StartupError(
                f"data dir {str(self.path)!r} is not writable; fix its permissions "
                "or choose another --data-dir"
            )

    def lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StartupError(
                f"data dir {str(self.path)!r} is not writable: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StartupError(
                    f"data dir {str(self.path)!r} is in use by another infinario-router; "
                    "stop it or choose another --data-dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def try_lock(self) -> bool:
        try:
            self.lock()
        except StartupError:
            return False
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def open_database(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) and check the database; errors are one line."""
    try:
        conn = open_connection(path)
        conn.executescript(SCHEMA)
        row = conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            conn.close()
            raise StartupError(
                f"database {str(path)!r} is corrupt ({row[0] if row else 'no answer'}); "
                "move it aside to start with an empty one"
            )
    except sqlite3.DatabaseError as exc:
        raise StartupError(
            f"database {str(path)!r} cannot be used ({exc}); "
            "if it is corrupt, move it aside to start with an empty one"
        ) from None
    return conn


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    done: trio.Event
    result: Any = None
    error: BaseException | None = None


class Pending(Generic[T]):
    """A submitted store operation; ``await result()`` once it has committed."""

    def __init__(self, op: _Op) -> None:
        self._op = op

    async def result(self) -> T:
        # Not cancellable: the transaction runs anyway, and a caller that walked
        # away could not tell whether its write happened.
        with trio.CancelScope(shield=True):
            await self._op.done.wait()
        if self._op.error is not None:
            raise self._op.error
        return self._op.result  # type: ignore[no-any-return]


class Store:
    """The one connection and its writer task. Use ``await call(fn)`` from trio."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._pending: list[_Op] = []
        self._wakeup = trio.Event()
        self._closed = False
        self.commits = 0

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Pending[T]:
        """Queue ``fn(conn)`` for the next group transaction without waiting for it.

        Operations run in the order submitted, so a later read sees an earlier
        write even before the writer has been awaited.
        """
        if self._closed:
            raise trio.ClosedResourceError("store is closed")
        op = _Op(fn, trio.Event())
        self._pending.append(op)
        self._wakeup.set()
        return Pending(op)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside the next group transaction and return its result."""
        return await self.submit(fn).result()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer loop; runs until cancelled, finishing the round in progress."""
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                ops, self._pending = self._pending, []
                if not ops:
                    continue
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._transaction, ops)
                for op in ops:
                    op.done.set()
        finally:
            self._closed = True
            # Anything queued after the last round runs now, synchronously: its
            # callers were promised a result.
            if self._pending:
                ops, self._pending = self._pending, []
                self._transaction(ops)
                for op in ops:
                    op.done.set()

    def _transaction(self, ops: Sequence[_Op]) -> None:
        """Run ``ops`` in one transaction; if one of them raises, run each alone.

        The common case pays for no savepoints: each would be two more
        statements, and every statement hands the GIL over to this thread and
        back. When an op raises, everything is rolled back and the ops run again
        in order, one transaction each, so only the failing op fails. Ops are
        functions of the connection, safe to run again after a rollback (at
        worst a sequence skips the numbers of the rolled-back attempt).
        """
        if not self._attempt(ops) and len(ops) > 1:
            for op in ops:
                self._attempt([op])
        self.commits += 1

    def _attempt(self, ops: Sequence[_Op]) -> bool:
        """One transaction for ``ops``; False when an op raised and all was rolled back."""
        conn = self.conn
        current: _Op | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                current = op
                op.result, op.error = op.fn(conn), None
            current = None
            conn.execute("COMMIT")
            return True
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for op in ops:
                op.result = None
            if current is not None and isinstance(exc, Exception):
                current.error = exc
                return False
            # Not an op's fault (the commit failed, or the thread is going away):
            # every op in the transaction failed with it.
            for op in ops:
                op.error = exc
            return True

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()


# --- operations: plain functions of a connection, run inside the writer's transaction --------


def meta_get(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else default


def meta_set(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES(?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (key, value),
    )


def max_seq(conn: sqlite3.Connection, table: str) -> int:
    assert table in ("journal", "outbox")
    row = conn.execute(f"SELECT MAX(seq) FROM {table}").fetchone()
    return int(row[0] or 0)


def spool_bytes(conn: sqlite3.Connection) -> int:
    journal = conn.execute("SELECT COALESCE(SUM(length(body)), 0) FROM journal").fetchone()[0]
    outbox = conn.execute(
        "SELECT COALESCE(SUM(length(body) + COALESCE(length(origin), 0)), 0) FROM outbox"
    ).fetchone()[0]
    return int(journal) + int(outbox)


def journal_accept(
    conn: sqlite3.Connection,
    write_key: str,
    messages: Sequence[tuple[str, bytes]],
    now: float,
    next_seq: int,
) -> list[int | None]:
    """Journal new messages, skipping (None) those whose messageId was seen already."""
    seen: set[str] = set()
    ids = [message_id for message_id, _ in messages]
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        seen.update(row[0] for row in conn.execute(
            f"SELECT message_id FROM dedup WHERE write_key = ? AND message_id IN ({marks})",
            (write_key, *part),
        ))
    result: list[int | None] = []
    rows = []
    fresh = []
    for message_id, body in messages:
        if message_id in seen:
            result.append(None)
            continue
        seen.add(message_id)  # the same id twice in one request counts once
        rows.append((next_seq, write_key, body))
        fresh.append((write_key, message_id, now))
        result.append(next_seq)
        next_seq += 1
    if rows:
        insert_many(conn, "INSERT INTO dedup(write_key, message_id, seen_at)", fresh)
        insert_many(conn, "INSERT INTO journal(seq, write_key, body)", rows)
    return result


# SQLite's historical default cap on bound parameters per statement.
MAX_PARAMS = 999


def insert_many(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """``head VALUES (...), (...), ...``: many rows per statement.

    ``executemany`` steps once per row, and the sqlite3 module releases and
    retakes the GIL around every step, which the busy trio thread then has to
    hand back. A few multi-row statements step a few times per round instead.
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, MAX_PARAMS // width)
    mark = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        part = rows[start : start + per]
        conn.execute(f"{head} VALUES {','.join([mark] * len(part))}",
                     [value for row in part for value in row])


def delete_seqs(conn: sqlite3.Connection, table: str, seqs: Sequence[int]) -> None:
    """Delete rows by seq, a few hundred per statement."""
    assert table in ("journal", "outbox")
    for start in range(0, len(seqs), 500):
        part = seqs[start : start + 500]
        conn.execute(f"DELETE FROM {table} WHERE seq IN ({','.join('?' * len(part))})", part)


def journal_load(
    conn: sqlite3.Connection, after: int, upto: int, limit: int
) -> list[tuple[int, str, bytes]]:
    return conn.execute(
        "SELECT seq, write_key, body FROM journal WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
        (after, upto, limit),
    ).fetchall()


def dedup_expire(conn: sqlite3.Connection, before: float) -> int:
    return conn.execute("DELETE FROM dedup WHERE seen_at < ?", (before,)).rowcount


def outbox_load(
    conn: sqlite3.Connection, lane: int, after: int, limit: int
) -> list[tuple[int, int, bytes, float, int]]:
    return conn.execute(
        "SELECT seq, customer, body, first_at, length(body) + COALESCE(length(origin), 0) "
        "FROM outbox WHERE lane = ? AND seq > ? "
        "ORDER BY seq LIMIT ?",
        (lane, after, limit),
    ).fetchall()


def outbox_relane(conn: sqlite3.Connection, lanes: int) -> None:
    """Lanes are ``customer % concurrency``; a changed concurrency re-deals the spool."""
    previous = meta_get(conn, "lanes")
    if previous != str(lanes):
        conn.execute("UPDATE outbox SET lane = customer % ?", (lanes,))
        meta_set(conn, "lanes", str(lanes))


class SeqCounter:
    """A sequence advanced only inside store operations, so only by the writer thread."""

    def __init__(self, start: int = 1) -> None:
        self.next = start
