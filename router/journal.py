"""The journal: each accepted request's messages, on disk before the 200, and messageId dedup.

One row per request. Its body keeps the request's shared ``context`` and
``integrations`` once, the messages' event times, and each message as the client
sent it, so a batch-level context is not copied into every stored message; the
customers stage gets the merged messages from memory and only recovery reads
the rows back. A row leaves the journal in the transaction that commits the
commands its messages produced.

Dedup is exact within the window and costs the same per message however many
ids the window holds: the ids live in memory as 64-bit hashes in a few
time-sliced generations (a generation is dropped whole once all of it is older
than the window), and on disk as one appended row of ids per request, read
back at start. Appending keeps the disk writes sequential; an index on disk
keyed by id would put every new id at a random page.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import segment
from .concat import join_wrapped
from .failpoints import crash_point

GENERATIONS = 8  # slices per window: memory holds at most 1/8 of a window beyond it

_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class Journaled:
    """A journaled request's accepted messages, in order, on their way to their customers."""

    seq: int
    write_key: str
    messages: list[dict[str, Any]]
    size: int  # bytes the journal row holds in the spool
    # Each message's ``segment.context_key``, where intake read it (extras are
    # remembered by it); None after a restart.
    contexts: Sequence[int | None] | None = None


# --- the row format ---------------------------------------------------------------------------


class _Body(msgspec.Struct):
    items: list[msgspec.Raw]
    shared: dict[str, Any] | None = None
    # Each item's event time. Rows written before the times were kept apart
    # have none: their items carry ``_time`` themselves.
    times: list[float] | None = None


_body_decoder = msgspec.json.Decoder(_Body)


def shared_part(context: dict[str, Any] | None,
                integrations: dict[str, Any] | None) -> dict[str, Any] | None:
    """A batch's envelope fields that apply to every item, or None."""
    shared = {}
    if context:
        shared["context"] = context
    if integrations:
        shared["integrations"] = integrations
    return shared or None


def encode_row(items: Sequence[segment.Item], shared: bytes | None = None,
               times: Sequence[float] | None = None) -> bytes:
    """A journal row's body: the shared part once, the items' event times, then each
    item's own bytes (``segment.item_bytes``)."""
    head = b'{"shared":' + shared + b',' if shared else b'{'
    if times is not None:
        head += b'"times":' + _encode(times) + b','
    return join_wrapped(head + b'"items":[', items, b"]}")


def decode_row(body: bytes) -> list[dict[str, Any]]:
    """The messages of a journal row, the shared part merged into each as intake did."""
    row = _body_decoder.decode(body)
    times = row.times
    if times is not None and len(times) != len(row.items):
        raise ValueError(f"row has {len(row.items)} items but {len(times)} times")
    messages = []
    for index, raw in enumerate(row.items):
        message = segment.decode_json(bytes(raw))
        if times is not None:
            message[segment.TIME_KEY] = times[index]
        if row.shared:
            message = merge_shared(message, row.shared)
        messages.append(message)
    return messages


def merge_shared(item: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """Batch ``context`` and ``integrations`` apply to every item; the item's own keys win.

    Only the top level is copied: the shared values themselves are shared by all
    items, so merging costs the same whatever the shared context's size.
    """
    for name, value in shared.items():
        own = item.get(name)
        if own is None:
            item[name] = dict(value)
        elif isinstance(own, dict):
            item[name] = {**value, **own}
    return item


# --- dedup ------------------------------------------------------------------------------------


# A generation's hashes are dealt over this many sets by their low bits. One set of
# millions of ids doubles its table in one go, rehashing every id while the event
# loop waits (42-57 ms at 1.6-2 million); a shard's resize moves 1/16 of that. More
# shards would stay under 50,000 ids longer, where a set grows its table fourfold
# instead of twofold: 64 of them cost 60-90 MB more at 2 million ids.
SHARDS = 16
_SHARD = SHARDS - 1


def _shards() -> list[set[int]]:
    return [set() for _ in range(SHARDS)]


@dataclass(slots=True)
class _Generation:
    started: float
    shards: list[set[int]] = field(default_factory=_shards)  # hash h is in shards[h & _SHARD]
    last_row: int = 0  # the newest dedup row whose ids are in this generation


class Dedup:
    """``(write key, messageId)`` pairs seen within the window, in memory, exact.

    Ids are kept as 64-bit hashes (the interpreter's string hash, salted per write
    key): two different ids collide with probability 2**-64 per pair, far below
    any disk's error rate, and a hash costs a fraction of a string's memory.
    The hash is per process, so a restart rebuilds it from the stored ids.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.slice = max(window / GENERATIONS, 0.001)
        self._gens: deque[_Generation] = deque()
        self._salts: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(shard) for gen in self._gens for shard in gen.shards)

    def _salt(self, write_key: str) -> int:
        salt = self._salts.get(write_key)
        if salt is None:
            salt = self._salts[write_key] = hash(("dedup", write_key))
        return salt

    def _current(self, now: float) -> _Generation:
        gens = self._gens
        if not gens or now - gens[-1].started >= self.slice:
            gens.append(_Generation(now))
        return gens[-1]

    def claim(self, write_key: str, message_ids: Iterable[str], now: float,
              row: int) -> list[bool]:
        """For each id, True when it is new (and is now remembered, under dedup ``row``).

        An id repeated within ``message_ids`` counts once. Remembering happens
        here, before the journal write, so two concurrent requests carrying the
        same id cannot both pass; ``release`` undoes it if the write fails.
        """
        salt = self._salt(write_key)
        gens = self._gens
        current = self._current(now)
        current.last_row = row
        shards = current.shards
        fresh = []
        if len(gens) == 1:
            for message_id in message_ids:
                h = hash(message_id) ^ salt
                shard = shards[h & _SHARD]
                if h in shard:
                    fresh.append(False)
                else:
                    shard.add(h)
                    fresh.append(True)
            return fresh
        older = [gen.shards for gen in list(gens)[:-1]]
        for message_id in message_ids:
            h = hash(message_id) ^ salt
            index = h & _SHARD
            shard = shards[index]
            if h in shard or any(h in old[index] for old in older):
                fresh.append(False)
            else:
                shard.add(h)
                fresh.append(True)
        return fresh

    def release(self, write_key: str, message_ids: Iterable[str]) -> None:
        """Forget ids claimed for a journal write that failed: a retry must pass."""
        salt = self._salt(write_key)
        for message_id in message_ids:
            h = hash(message_id) ^ salt
            for gen in self._gens:
                gen.shards[h & _SHARD].discard(h)

    def restore(self, write_key: str, message_ids: Iterable[str], at: float, row: int) -> None:
        """Remember ids read back from the dedup table at start, seen at ``at``."""
        salt = self._salt(write_key)
        gen = self._current(at)
        gen.last_row = max(gen.last_row, row)
        shards = gen.shards
        for message_id in message_ids:
            h = hash(message_id) ^ salt
            shards[h & _SHARD].add(h)

    def expire(self, now: float) -> int:
        """Drop generations wholly older than the window; return the newest dedup row
        that may be deleted (0: none).

        A generation's ids were all seen before the next generation started, so
        it goes once that start is older than the window: an id is remembered
        for at least the window, at most a slice longer.
        """
        gens = self._gens
        cutoff = now - self.window
        last = 0
        while len(gens) > 1 and gens[1].started <= cutoff:
            last = gens.popleft().last_row
        if len(gens) == 1 and now - gens[0].started >= self.window + self.slice:
            last = gens.popleft().last_row
        return last


def encode_ids(message_ids: Sequence[str]) -> bytes:
    """A request's messageIds as stored: a JSON array (ids may hold any character)."""
    return _encode(message_ids)


_ids_decoder = msgspec.json.Decoder(list[str])


def decode_ids(data: bytes) -> list[str]:
    return _ids_decoder.decode(data)


# --- store operations --------------------------------------------------------------------------


def append(conn: sqlite3.Connection, *, seq: int, write_key: str, body: bytes, dedup_row: int,
           ids: bytes, now: float) -> None:
    """Journal one request and record its messageIds for dedup (one writer op)."""
    conn.execute("INSERT INTO journal(seq, write_key, body) VALUES(?, ?, ?)",
                 (seq, write_key, body))
    crash_point("journal-append")
    conn.execute("INSERT INTO dedup(id, at, write_key, ids) VALUES(?, ?, ?, ?)",
                 (dedup_row, now, write_key, ids))


def load_dedup(conn: sqlite3.Connection, since: float) -> list[tuple[int, float, str, bytes]]:
    return conn.execute(
        "SELECT id, at, write_key, ids FROM dedup WHERE at >= ? ORDER BY id", (since,)
    ).fetchall()


def expire_dedup(conn: sqlite3.Connection, upto_row: int) -> None:
    # Rows are appended in id order, so expiry deletes at the left edge of the table.
    conn.execute("DELETE FROM dedup WHERE id <= ?", (upto_row,))


def load_rows(conn: sqlite3.Connection, after: int, upto: int,
              limit: int) -> list[tuple[int, str, bytes]]:
    return conn.execute(
        "SELECT seq, write_key, body FROM journal WHERE seq > ? AND seq <= ? ORDER BY seq "
        "LIMIT ?", (after, upto, limit),
    ).fetchall()


def spool_bytes(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COALESCE(SUM(length(body)), 0) FROM journal").fetchone()
    return int(row[0])


def set_aside(conn: sqlite3.Connection, *, seq: int, body: bytes, reason: str,
              now: float) -> None:
    """An unreadable journal row becomes a dead letter instead of stopping the start."""
    conn.execute(
        "INSERT INTO dead_letters(created_at, project, customer, command, origin, status, errors,"
        " attempts, first_at, last_at) VALUES(?, '', 0, NULL, ?, 'unreadable', ?, 0, ?, ?)",
        (now, body, _encode([f"journal row {seq}: {reason}"]).decode(), now, now),
    )
    conn.execute("DELETE FROM journal WHERE seq = ?", (seq,))

