"""SQLite state and journal (WAL) in the data directory, behind one writer thread.

All reads and writes go through a single connection driven by one writer task:
callers ``await store.call(fn)`` and every operation queued while the previous
transaction was running is executed in the next one, so concurrent requests
share one commit (group commit) and durability costs one fsync per round, not
one per request. One failing operation does not undo its neighbours: the round
is rolled back and its operations run again one transaction each.

Tables (schema version 2):
    journal        one row per accepted request: its messages, not yet turned into commands
    dedup          one row per accepted request: its messageIds, kept for the dedup window
    outbox         one row per round, sender lane and project: wire-encoded commands not
                   yet answered finally, with which of them are done
    customers      hibernated customer state, with the open session's deadline
    ids            (project, id) -> customer
    schema         event types and property keys Infinario already knows, per project
    dead_letters   commands Infinario refused or that ran out of retries, refused messages
    meta           small counters
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog
import trio

from .errors import StartupError
from .storage import OutOfTurn, StorageUnavailable, is_storage_error, unavailable

T = TypeVar("T")

log = structlog.get_logger("router.store")

DB_NAME = "router.db"
WAL_CHECKPOINT_PAGES = 10_000
# After a checkpoint the WAL file is cut back to this size: without a limit it keeps
# the largest size it ever reached, which counts against the spool cap.
WAL_SIZE_LIMIT = 48 * 1024**2
FREE_PAGES_INTERVAL = 0.1  # seconds between counts of the database's reusable pages
RETRY_FIRST = 0.05  # seconds before a write that found the disk unavailable is tried again
RETRY_MAX = 2.0
LOCK_NAME = "router.lock"

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal(
    seq INTEGER PRIMARY KEY, write_key TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dedup(
    id INTEGER PRIMARY KEY, at REAL NOT NULL, write_key TEXT NOT NULL, ids BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox(
    seq INTEGER PRIMARY KEY, lane INTEGER NOT NULL, project TEXT NOT NULL,
    customers BLOB NOT NULL, body BLOB NOT NULL, done BLOB, first_at REAL NOT NULL);
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
    # Some builds of SQLite (Debian's among them) zero every deleted row by
    # default, so each retired journal and outbox row was written twice: about
    # a quarter of the bytes written per message. FAST zeroes only pages the
    # delete rewrites anyway; a freed page's old bytes stay until it is reused.
    conn.execute("PRAGMA secure_delete=FAST")
    # A statement that rewrites pages this transaction already wrote (an outbox
    # row on the pages the retired journal rows just freed) saves their old
    # contents in a statement journal; past 64 KiB that spills to a temporary
    # file, created, written and deleted for every round. In memory it is a copy.
    conn.execute("PRAGMA temp_store=MEMORY")
    # 16 MiB: the page cache counts against RSS, and a backlog must not grow it much.
    conn.execute("PRAGMA cache_size=-16384")
    # Journal and outbox rows live for seconds: a 40 MiB WAL (default 4 MiB)
    # lets their pages be reused several times between checkpoints, which cut
    # the bytes written per message by about 30%.
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    return conn


def limit_wal(conn: sqlite3.Connection, cap: int) -> None:
    """Keep the WAL to at most a quarter of a small spool cap (it is checkpointed
    and cut back once it reaches that), so the log alone never fills the cap."""
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    budget = min(WAL_SIZE_LIMIT, cap // 4)
    pages = max(100, min(WAL_CHECKPOINT_PAGES, budget // page))
    conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
    conn.execute(f"PRAGMA journal_size_limit={max(budget, pages * page)}")


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
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            _set_aside_v1(conn)
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
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


def _set_aside_v1(conn: sqlite3.Connection) -> None:
    """Rename version 1's per-message dedup and per-command outbox tables out of the way.

    ``migrate.py`` moves their rows into the version 2 tables when the relay starts,
    so an upgrade keeps every acknowledged message and every pending command.
    """
    for table in ("dedup", "outbox"):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if "message_id" in columns or "customer" in columns:
            conn.execute(f"DROP INDEX IF EXISTS {table}_seen")
            conn.execute(f"DROP INDEX IF EXISTS {table}_lane")
            conn.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")


class Chain:
    """Store operations that must commit one after another, in the order submitted.

    An operation of a chain runs only once the one before it has committed;
    otherwise it fails with ``OutOfTurn`` without running, and its caller submits
    it again (``Store.resubmit``) after the earlier one. A round that failed on a
    full disk thus never lets a later round overtake it.
    """

    def __init__(self) -> None:
        self.issued = 0  # links handed out
        self.committed = 0  # the last link that committed


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    done: trio.Event
    result: Any = None
    error: BaseException | None = None
    chain: Chain | None = None
    link: int = 0


class Pending(Generic[T]):
    """A submitted store operation; ``await result()`` once it has committed."""

    def __init__(self, op: _Op) -> None:
        self._op = op

    @property
    def ordered(self) -> bool:
        """True for an operation of a chain (see ``Chain``)."""
        return self._op.chain is not None

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
        # The last failure to write (disk full, I/O error, read-only), until a
        # transaction commits again: /ready reports it.
        self.write_error: str | None = None
        # The last transaction failed for want of disk (full or I/O error).
        self.failing = False
        # Bytes of free pages in the database file: room it reuses before growing.
        self.free_bytes = 0
        self._free_at = -FREE_PAGES_INTERVAL
        self._page_size = 0
        self.checkpoint_wanted = False

    def submit(self, fn: Callable[[sqlite3.Connection], T], *,
               chain: Chain | None = None) -> Pending[T]:
        """Queue ``fn(conn)`` for the next group transaction without waiting for it.

        Operations run in the order submitted, so a later read sees an earlier
        write even before the writer has been awaited.
        """
        link = 0
        if chain is not None:
            chain.issued += 1
            link = chain.issued
        return self._queue(_Op(fn, trio.Event(), chain=chain, link=link))

    def resubmit(self, pending: Pending[T]) -> Pending[T]:
        """Queue a failed operation again, keeping its place in its chain."""
        old = pending._op
        return self._queue(_Op(old.fn, trio.Event(), chain=old.chain, link=old.link))

    async def settle(self, pending: Pending[T]) -> T:
        """The result of ``pending``, submitting it again until the disk takes it.

        While the disk is full or failing the same operation is tried again with
        a growing pause; an operation that found an earlier one of its chain not
        yet committed goes again at once (its caller waited for that one).
        """
        pause = RETRY_FIRST
        while True:
            try:
                return await pending.result()
            except OutOfTurn:
                await trio.sleep(0.001)
            except StorageUnavailable as exc:
                if pause == RETRY_FIRST:
                    log.warning("write failed; keeping it in memory and retrying",
                                error=str(exc))
                await trio.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)
            pending = self.resubmit(pending)

    def _queue(self, op: _Op) -> Pending[Any]:
        if self._closed:
            raise trio.ClosedResourceError("store is closed")
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
        self._housekeeping()

    def _housekeeping(self) -> None:
        """Between transactions: a checkpoint when asked for, and the free page count."""
        conn = self.conn
        try:
            if self.checkpoint_wanted:
                self.checkpoint_wanted = False
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            now = time.monotonic()
            if now - self._free_at >= FREE_PAGES_INTERVAL:
                self._free_at = now
                if not self._page_size:
                    self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
                free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                self.free_bytes = free * self._page_size
        except sqlite3.Error:
            pass  # advisory only: the next transaction tries again

    def _attempt(self, ops: Sequence[_Op]) -> bool:
        """One transaction for ``ops``; False when an op raised and all was rolled back."""
        conn = self.conn
        current: _Op | None = None
        marks: dict[Chain, int] = {}  # each chain's last link in this transaction
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                current = op
                chain = op.chain
                if chain is not None:
                    last = marks.get(chain, chain.committed)
                    if op.link != last + 1:
                        op.result, op.error = None, OutOfTurn(
                            f"waits for an earlier write (#{last + 1}) to commit first")
                        continue
                op.result, op.error = op.fn(conn), None
                if chain is not None:
                    marks[chain] = op.link
            current = None
            conn.execute("COMMIT")
            self.write_error = None
            for chain, link in marks.items():
                chain.committed = link
            self.failing = False
            return True
        except BaseException as exc:
            if _cannot_write(exc):
                self.write_error = str(exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = exc
            if is_storage_error(exc):
                # A full or failing disk: the caller waits and tries again.
                self.failing = True
                error = unavailable(exc)
            for op in ops:
                op.result = None
            if current is not None and isinstance(exc, Exception):
                current.error = error
                return False
            if error is not exc and len(ops) > 1:
                # The commit found the disk full: run each op alone, so reads and
                # writes that fit still succeed and only the others fail.
                for op in ops:
                    op.error = error
                return False
            # Not an op's fault (the commit failed, or the thread is going away):
            # every op in the transaction failed with it.
            for op in ops:
                op.error = error
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
    assert table in ("journal", "outbox", "dedup")
    key = "id" if table == "dedup" else "seq"
    row = conn.execute(f"SELECT MAX({key}) FROM {table}").fetchone()
    return int(row[0] or 0)


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
    for part in in_chunks(seqs):
        conn.execute(f"DELETE FROM {table} WHERE seq IN ({','.join('?' * len(part))})", part)


def in_chunks(values: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """``values`` a few hundred at a time: SQLite caps the parameters of one statement."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


class SeqCounter:
    """Sequence numbers handed out in the trio thread.

    Store operations run in submission order, so rows numbered before they are
    submitted reach the table in number order.
    """

    def __init__(self, start: int = 1) -> None:
        self.next = start

    def take(self, count: int = 1) -> int:
        """The first of ``count`` consecutive numbers, now taken."""
        first = self.next
        self.next += count
        return first


# SQLite's primary result codes for a database that cannot be written: READONLY,
# IOERR, CORRUPT, FULL, CANTOPEN. Other errors (a constraint, a bug) say nothing
# about the disk.
_WRITE_FAILURES = frozenset({8, 10, 11, 13, 14})


def _cannot_write(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _WRITE_FAILURES
