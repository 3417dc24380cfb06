"""A partition's outbox stream as a sender's backlog (``outbox.Backlog``).

The sender is the embedded relay's, with one lane per partition: a partition's
commands leave in commit order, one request in flight, as a lane's do. Its rows
are the entries of ``out:{P}:<p>``; a row's number is its stream id packed into
an int, so rows compare in stream order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import coredis
import msgspec
from coredis.exceptions import RedisError

from .. import outbox
from ..outbox import OutboxRow
from ..storage import StorageUnavailable
from .commit import Commits, OutboxEntry, Outcome
from .keys import Keys

_SEQ_BITS = 20  # entries per millisecond an id can number; Redis makes far fewer
_json = msgspec.json.Encoder().encode


def seq_of(entry_id: bytes) -> int:
    """A stream id ``<ms>-<n>`` as one increasing int."""
    ms, _, n = entry_id.partition(b"-")
    return (int(ms) << _SEQ_BITS) | int(n or b"0")


def entry_id(seq: int) -> bytes:
    return b"%d-%d" % (seq >> _SEQ_BITS, seq & ((1 << _SEQ_BITS) - 1))


def row_of(entry_id_: bytes, entry: OutboxEntry, project: str,
           marks: bytes | None = None) -> OutboxRow:
    commands = outbox.decode_body(entry.body)
    final = bytearray(marks) if marks else bytearray(len(commands))
    return OutboxRow(seq_of(entry_id_), entry.lane, project, commands,
                     outbox.unpack_customers(entry.customers), entry.first_at, len(entry.body),
                     final)


class RedisBacklog:
    """``out:{P}:<p>`` for the sender of the worker that holds the partition's lease."""

    def __init__(self, client: coredis.Redis[bytes], commits: Commits, keys: Keys,
                 partition: int, token: int) -> None:
        self.client = client
        self.commits = commits
        self.keys = keys
        self.partition = partition
        self.token = token

    async def load_lane(self, lane: int, after: int, limit: int) -> list[OutboxRow]:
        start = b"(" + entry_id(after) if after else b"-"
        stream = self.keys.outbox(self.partition)
        try:
            entries = await self.client.xrange(stream, start, b"+", count=limit)
            ids = [entry.identifier for entry in entries]
            marks = (await self.client.hmget(self.keys.progress(self.partition), ids)
                     if ids else ())
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc
        return [row_of(_bytes(entry.identifier),
                       OutboxEntry.from_fields(entry.field_values),  # type: ignore[arg-type]
                       self.keys.project, mark)
                for entry, mark in zip(entries, marks or [None] * len(entries), strict=True)]

    async def record(self, finished: Sequence[int], partial: Sequence[tuple[bytes, int]],
                     dead: Sequence[tuple[Any, ...]]) -> None:
        try:
            for letter in dead:
                await self.client.xadd(self.keys.dead_letters, failed_letter(letter))
            if partial:
                await self.client.hset(self.keys.progress(self.partition),
                                       {entry_id(seq): marks for marks, seq in partial})
            if finished:
                done = await self.commits.finish(self.partition, self.token,
                                                 [entry_id(seq) for seq in finished])
                if done.outcome is Outcome.FENCED:
                    raise StorageUnavailable(
                        f"partition {self.partition} of {self.keys.project!r} has another "
                        "owner now")
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def failed_letter(letter: Sequence[Any]) -> dict[bytes, bytes]:
    """A sender's dead letter ``(created_at, project, customer, command, status, errors,
    attempts, first_at, last_at)`` as a ``dl:{P}`` entry."""
    created_at, project, customer, command, status, errors, attempts, first_at, last_at = letter
    return {b"kind": b"failed", b"project": str(project).encode(), b"k": b"%d" % customer,
            b"command": bytes(command), b"status": str(status).encode(),
            b"errors": errors.encode() if isinstance(errors, str) else bytes(errors),
            b"attempts": b"%d" % attempts, b"first_at": repr(float(first_at)).encode(),
            b"last_at": repr(float(last_at)).encode(),
            b"at": repr(float(created_at or time.time())).encode()}
