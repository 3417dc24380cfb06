"""One fenced, idempotent commit per round of a partition (``commit.lua``), and the
sender's end of the outbox (``finish.lua``).

A round's writes (inputs acknowledged, customer states, session timers, outbox
entries, hand-offs to other partitions, dead letters) land in Redis in one script
run, or not at all. The script first checks the lease token (``FENCED``: another
worker owns the partition now) and then the round id (``DUP``: already committed).

``DUP`` answers the retry hazard: the Redis client retries a command after a
connection error, and the first run of a script may have succeeded before the
connection broke (the client drops a connection shared with a blocking command
that is cancelled, and fails every request on it). A round id that this owner sent
only once and that comes back ``DUP`` was therefore committed by that first run:
treat it as committed. Its outbox entry ids are then unknown to the caller; the
outbox stream holds them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import coredis
from coredis.exceptions import RedisError
from coredis.typing import ResponseType

from .keys import GROUP, Keys
from .scripts import source

Fields = Mapping[bytes, bytes]


class Outcome(enum.Enum):
    OK = "OK"  # written
    DUP = "DUP"  # this round (or a later one) was already committed: nothing written
    FENCED = "FENCED"  # the lease is another worker's, or nobody's: nothing written


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outbox entry: a sender lane's commands, encoded once (opaque to Redis)."""

    lane: int
    body: bytes  # the commands' wire form
    count: int  # how many commands ``body`` holds
    customers: bytes = b""  # each command's customer (outbox.pack_customers)
    first_at: float = 0.0  # when the commands were made: their retry window starts here

    def fields(self) -> dict[bytes, bytes]:
        return {b"lane": b"%d" % self.lane, b"body": self.body, b"count": b"%d" % self.count,
                b"customers": self.customers, b"first_at": repr(self.first_at).encode()}

    @classmethod
    def from_fields(cls, fields: Fields) -> OutboxEntry:
        try:
            return cls(int(fields[b"lane"]), fields[b"body"], int(fields[b"count"]),
                       fields.get(b"customers", b""), float(fields.get(b"first_at", b"0")))
        except (KeyError, ValueError) as error:
            raise ValueError(f"not an outbox entry: {dict(fields)!r} ({error})") from None


@dataclass(slots=True, kw_only=True)
class RoundWrites:
    """Everything one round changes in its partition; ``commit`` writes it in one step."""

    acks: Sequence[bytes] = ()  # input entry ids the round consumed
    states: Mapping[int, bytes] = field(default_factory=dict)  # customer -> encoded state
    deleted: Sequence[int] = ()  # customers whose state goes (applied after ``states``)
    timers: Mapping[int, float] = field(default_factory=dict)  # customer -> session deadline
    untimed: Sequence[int] = ()  # customers without a deadline now (applied after ``timers``)
    outbox: Sequence[OutboxEntry] = ()
    handoffs: Sequence[tuple[int, Fields]] = ()  # (partition, entry) for another inbox
    dead: Sequence[Fields] = ()  # dead letters


@dataclass(frozen=True, slots=True)
class Committed:
    outcome: Outcome
    acked: int = 0  # inputs removed from the pending list (OK only)
    outbox_ids: tuple[bytes, ...] = ()  # in ``RoundWrites.outbox`` order (OK only)


@dataclass(frozen=True, slots=True)
class Finished:
    outcome: Outcome  # OK or FENCED
    deleted: int = 0
    dead: int = 0


def commit_call(keys: Keys, partition: int, token: int, round_id: int,
                writes: RoundWrites) -> tuple[list[str], list[bytes | str | int]]:
    """The KEYS and ARGV of ``commit.lua`` for one round (pure; see the script's header)."""
    _check_partition(keys, partition)
    if token < 1 or round_id < 1:
        raise ValueError(f"token and round id start at 1; got {token} and {round_id}")
    targets: dict[int, int] = {}  # partition -> KEYS position
    script_keys = [keys.lease(partition), keys.round(partition), keys.inbox(partition),
                   keys.states(partition), keys.timers(partition), keys.outbox(partition),
                   keys.dead_letters]
    for target, _ in writes.handoffs:
        _check_partition(keys, target)
        if target not in targets:
            script_keys.append(keys.inbox(target))
            targets[target] = len(script_keys)
    args: list[bytes | str | int] = [token, round_id, GROUP, len(writes.acks), *writes.acks,
                                     len(writes.states)]
    for customer, state in writes.states.items():
        args += [customer, state]
    args += [len(writes.deleted), *writes.deleted, len(writes.timers)]
    for customer, deadline in writes.timers.items():
        if not math.isfinite(deadline):
            raise ValueError(f"customer {customer}'s session deadline is {deadline}; "
                             f"leave it out of timers (or put it in untimed)")
        args += [repr(float(deadline)), customer]
    args += [len(writes.untimed), *writes.untimed, len(writes.outbox)]
    for entry in writes.outbox:
        args += _entry(entry.fields())
    args.append(len(writes.handoffs))
    for target, fields in writes.handoffs:
        args += [targets[target], *_entry(fields)]
    args.append(len(writes.dead))
    for fields in writes.dead:
        args += _entry(fields)
    return script_keys, args


class Commits:
    """Commits rounds of a project's partitions and finishes their outbox entries."""

    def __init__(self, client: coredis.Redis[bytes], keys: Keys) -> None:
        self.keys = keys
        self._commit = client.register_script(source("commit"))
        self._finish = client.register_script(source("finish"))

    async def commit(self, partition: int, token: int, round_id: int,
                     writes: RoundWrites) -> Committed:
        """Write the round, if ``token`` holds the lease and ``round_id`` is new.

        Round ids grow by at least one per commit under one token and may restart at 1
        under a new token (the script compares (token, round) pairs).
        """
        script_keys, args = commit_call(self.keys, partition, token, round_id, writes)
        reply: ResponseType = await self._commit(script_keys, args)
        return parse_commit(reply)

    async def finish(self, partition: int, token: int, done: Sequence[bytes] = (),
                     dead: Sequence[tuple[bytes, str]] = ()) -> Finished:
        """Delete the outbox entries in ``done``; move ``dead`` ones (id, reason) to dl:{P}."""
        _check_partition(self.keys, partition)
        args: list[bytes | str | int] = [token, partition, len(done), *done, len(dead)]
        for entry_id, reason in dead:
            args += [entry_id, reason]
        reply: ResponseType = await self._finish(
            [self.keys.lease(partition), self.keys.outbox(partition), self.keys.dead_letters,
             self.keys.progress(partition)],
            args)
        outcome, counts = _status(reply, "finish")
        if outcome is Outcome.FENCED:
            return Finished(outcome)
        deleted, moved = counts
        if not (isinstance(deleted, int) and isinstance(moved, int)):
            raise RedisError(f"finish.lua answered {reply!r}; is router/cluster current?")
        return Finished(outcome, deleted, moved)


def parse_commit(reply: ResponseType) -> Committed:
    """``commit.lua``'s reply as a ``Committed``."""
    outcome, rest = _status(reply, "commit")
    if outcome is not Outcome.OK:
        return Committed(outcome)
    acked, *ids = rest
    return Committed(outcome, int(acked), tuple(bytes(i) for i in ids))  # type: ignore[arg-type]


def _status(reply: ResponseType, script: str) -> tuple[Outcome, list[ResponseType]]:
    if isinstance(reply, list) and reply and isinstance(reply[0], bytes):
        try:
            return Outcome(reply[0].decode()), list(reply[1:])
        except ValueError:
            pass
    raise RedisError(f"{script}.lua answered {reply!r}; is router/cluster current?")


def _entry(fields: Fields) -> list[bytes | str | int]:
    if not fields:
        raise ValueError("a stream entry needs at least one field")
    flat: list[bytes | str | int] = [len(fields)]
    for name, value in fields.items():
        flat += [name, value]
    return flat


def _check_partition(keys: Keys, partition: int) -> None:
    if not 0 <= partition < keys.partitions:
        raise ValueError(f"partition {partition} is outside 0..{keys.partitions - 1} "
                         f"of project {keys.project!r}")
