"""A partition's input stream as its owner reads it, and the state a new owner loads.

The consumer name is the partition's name (``p<n>``), not the worker's: a new owner
inherits the pending entries list of a dead one and replays it from id 0 (``recover``)
before it reads new entries (``read``). Reads are fenced by the lease token like
commits (``read.lua``).

Reads run as a script for a second reason: the client treats every XREADGROUP as a
blocking command (even without BLOCK), and cancelling one drops the connection it
shares with other requests, which the client then retries. A script call is
multiplexed like any other command; only ``wait`` blocks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import coredis
from coredis.exceptions import RedisError, StreamDuplicateConsumerGroupError
from coredis.tokens import PureToken
from coredis.typing import ResponseType

from .keys import GROUP, Keys
from .scripts import source

READ_COUNT = 1000  # entries per read: about one round


class Fenced(Exception):
    """The partition's lease holds another token, or none: this worker must stop using it."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: bytes
    fields: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Batch:
    entries: list[Entry]
    cursor: bytes  # every entry after this id is new (see ``Inbox.wait``)


def consumer(partition: int) -> str:
    """The consumer name of a partition in the ``actors`` group: whoever owns it reads as it."""
    return f"p{partition}"


class Inbox:
    """The owner's view of ``in:{P}:<partition>``, its states and its session timers."""

    def __init__(self, client: coredis.Redis[bytes], keys: Keys, partition: int) -> None:
        if not 0 <= partition < keys.partitions:
            raise ValueError(f"partition {partition} is outside 0..{keys.partitions - 1}")
        self.client = client
        self.keys = keys
        self.partition = partition
        self.consumer = consumer(partition)
        self.stream = keys.inbox(partition)
        self._read = client.register_script(source("read"))

    async def ensure_group(self) -> None:
        """Create the ``actors`` group (and the stream) if missing, from the first entry."""
        # Id 0, not $: entries routed before any owner existed are new to the group.
        with contextlib.suppress(StreamDuplicateConsumerGroupError):
            await self.client.xgroup_create(self.stream, GROUP, identifier="0", mkstream=True)

    async def recover(self, token: int, count: int = READ_COUNT) -> list[Entry]:
        """Every entry delivered to this partition and not acknowledged, oldest first.

        These are the previous owner's unfinished (and stashed) entries: replay them
        before reading new ones.
        """
        await self.ensure_group()
        entries: list[Entry] = []
        after = b"0"
        while True:
            batch = await self.pending(token, after, count)
            if batch.cursor == b"0-0":  # nothing pending above `after`
                return entries
            entries += batch.entries
            after = batch.cursor

    async def pending(self, token: int, after: bytes = b"0", count: int = READ_COUNT) -> Batch:
        """Up to ``count`` pending entries with ids above ``after``."""
        return await self._call(token, count, after)

    async def read(self, token: int, count: int = READ_COUNT) -> Batch:
        """Up to ``count`` entries never delivered before (``>``); they become pending."""
        return await self._call(token, count, b">")

    async def wait(self, cursor: bytes, block: float) -> bool:
        """Whether an entry after ``cursor`` exists, waiting up to ``block`` seconds for one.

        A blocking command: cancelling it drops its connection, and the client retries
        the commands that shared it, so give waits a client of their own.
        """
        found = await self.client.xread({self.stream: cursor}, count=1,
                                        block=max(1, math.ceil(block * 1000)))
        return bool(found)

    async def load(self, customers: Iterable[int]) -> dict[int, bytes]:
        """The stored states of ``customers`` that have one."""
        wanted = list(customers)
        if not wanted:
            return {}
        values = await self.client.hmget(self.keys.states(self.partition),
                                         [str(c) for c in wanted])
        return {c: v for c, v in zip(wanted, values, strict=True) if v is not None}

    async def due_timers(self, upto: float = math.inf,
                         limit: int | None = None) -> list[tuple[float, int]]:
        """(deadline, customer) of sessions due by ``upto``, earliest first."""
        found = await self.client.zrange(
            self.keys.timers(self.partition), "-inf", "+inf" if upto == math.inf else repr(upto),
            sortby=PureToken.BYSCORE, offset=0 if limit is not None else None, count=limit,
            withscores=True)
        return [(float(score), int(member)) for member, score in found]

    async def _call(self, token: int, count: int, start: bytes) -> Batch:
        reply: ResponseType = await self._read([self.keys.lease(self.partition), self.stream],
                                 [token, GROUP, self.consumer, count, start])
        return _batch(reply, self.stream)


def _batch(reply: ResponseType, stream: str) -> Batch:
    if isinstance(reply, list) and reply == [b"FENCED"]:
        raise Fenced(f"{stream}: the lease is no longer this worker's")
    if not (isinstance(reply, list) and len(reply) >= 2 and reply[0] == b"OK"
            and isinstance(reply[1], bytes) and len(reply) % 2 == 0):
        raise RedisError(f"read.lua answered {reply!r}; is router/cluster current?")
    entries = []
    for i in range(2, len(reply), 2):
        entry_id, flat = reply[i], reply[i + 1]
        if not isinstance(entry_id, bytes) or not isinstance(flat, list):
            raise RedisError(f"read.lua answered an entry {entry_id!r}: {flat!r}")
        entries.append(Entry(entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))  # type: ignore[arg-type]
    return Batch(entries, reply[1])
