"""Bad days on the disk: a full or failing disk is a condition to wait out, not a crash.

SQLite reports a full disk as ``SQLITE_FULL`` and a failing one as ``SQLITE_IOERR``;
the store turns either into ``StorageUnavailable``. Intake answers it with 503 and
``Retry-After`` (the client keeps the messages), and the stages behind it keep
what they hold in memory and try the same write again later: every row already
acknowledged is still in the journal or the outbox, because a failed transaction
changed nothing.

``DiskUsage`` measures what the data dir really takes on disk (the database and
its write-ahead log, less the pages SQLite will reuse) for the spool cap.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

# SQLite's primary result codes (the low byte of an extended code).
SQLITE_IOERR = 10
SQLITE_FULL = 13
_STORAGE_CODES = frozenset({SQLITE_IOERR, SQLITE_FULL})
_STORAGE_TEXT = ("database or disk is full", "disk i/o error")

DISK_CHECK_INTERVAL = 0.1  # seconds a measured size is trusted


class StorageUnavailable(Exception):
    """A write could not reach the disk (full, or an I/O error); nothing of it was kept."""


class OutOfTurn(StorageUnavailable):
    """An ordered write waits for an earlier one that has not committed yet."""


def is_storage_error(exc: BaseException) -> bool:
    """True for SQLite's full-disk and I/O errors, whatever the statement."""
    if isinstance(exc, StorageUnavailable):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _STORAGE_CODES:
        return True
    text = str(exc).lower()
    return any(part in text for part in _STORAGE_TEXT)


def unavailable(exc: BaseException) -> StorageUnavailable:
    """``exc`` as a ``StorageUnavailable`` whose message says what the disk answered."""
    if isinstance(exc, StorageUnavailable):
        return exc
    error = StorageUnavailable(f"storage unavailable: {exc}")
    error.__cause__ = exc
    return error


class DiskUsage:
    """Bytes the database and its WAL take on disk, measured at most every 100 ms.

    ``reusable`` reports the bytes of free pages inside the database file (the
    store counts them): a file that grew during a backlog does not shrink, but
    its free pages are filled again before it grows, so they do not count.
    """

    def __init__(self, db_path: Path, cap: int, reusable: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = (db_path, Path(f"{db_path}-wal"))
        self.cap = cap
        self.reusable = reusable
        self.clock = clock
        self._measured = 0
        self._at = -DISK_CHECK_INTERVAL

    @property
    def bytes(self) -> int:
        now = self.clock()
        if now - self._at >= DISK_CHECK_INTERVAL:
            total = 0
            for path in self.paths:
                try:
                    total += os.stat(path).st_size
                except FileNotFoundError:
                    pass
            self._measured = max(0, total - self.reusable())
            self._at = now
        return self._measured

    @property
    def full(self) -> bool:
        return self.bytes >= self.cap
