"""The round commit: whole or nothing, refused to a worker that lost its lease, written once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import coredis
import pytest
import trio
from coredis.exceptions import ResponseError

from router.cluster.commit import (
    Commits,
    Committed,
    OutboxEntry,
    Outcome,
    RoundWrites,
    commit_call,
    parse_commit,
)
from router.cluster.inbox import Fenced, Inbox
from router.cluster.keys import GROUP, Keys
from router.cluster.leases import Lease, Leases
from router.cluster.scripts import source

from .cluster_support import Gate, port_of, until

pytestmark = pytest.mark.redis

KEYS = Keys("proj", 4)
P = 1  # the partition under test
TOKEN = 5
STATE = b"\x82\xa1k\x07\xa1s\xc4\x03\x00\xff\x80"  # msgpack, with bytes that are not UTF-8
ROWS = (OutboxEntry(lane=3, body=b'[{"a":1}]', count=1),
        OutboxEntry(lane=0, body=b'[{"b":2},{"c":3}]', count=2))
ABSORB = {b"k": b"11", b"c": b"absorb", b"v": b"7", b"s": STATE}


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(redis_url) as client:
        yield client


def a_round(acks: list[bytes], keys: Keys = KEYS, target: int = 2) -> RoundWrites:
    return RoundWrites(
        acks=acks, states={7: STATE, 8: b"merged away"}, deleted=[8],
        timers={7: 1800.25, 9: 10.0}, untimed=[9], outbox=ROWS,
        handoffs=[(target, ABSORB)], dead=[{b"reason": b"alias_registered", b"body": b"{}"}])


async def delivered(redis: coredis.Redis[bytes], n: int, token: int = TOKEN,
                    keys: Keys = KEYS, partition: int = P) -> list[bytes]:
    """Route ``n`` messages to the partition and read them as its owner: they are pending."""
    inbox = Inbox(redis, keys, partition)
    await inbox.ensure_group()
    for i in range(n):
        await redis.xadd(keys.inbox(partition), {b"k": b"%d" % i, b"b": b"message %d" % i})
    batch = await inbox.read(token)
    assert len(batch.entries) == n
    return [entry.id for entry in batch.entries]


async def pending(redis: coredis.Redis[bytes], keys: Keys = KEYS, partition: int = P) -> int:
    summary: Any = await redis.xpending(keys.inbox(partition), GROUP)
    return int(summary.pending)


async def outbox(redis: coredis.Redis[bytes], partition: int = P) -> list[OutboxEntry]:
    entries: Any = await redis.xrange(KEYS.outbox(partition))
    return [OutboxEntry.from_fields(e.field_values) for e in entries]


async def nothing_written(redis: coredis.Redis[bytes], keys: Keys = KEYS, partition: int = P,
                          target: int = 2) -> bool:
    return await redis.exists([keys.round(partition), keys.states(partition),
                               keys.timers(partition), keys.outbox(partition),
                               keys.inbox(target), keys.dead_letters]) == 0


class TestCommit:
    """One script run writes the whole round, or nothing."""

    async def test_a_round_is_written_whole(self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(TOKEN))
        ids = await delivered(redis, 3)
        done = await Commits(redis, KEYS).commit(P, TOKEN, 1, a_round(ids))

        assert done.outcome is Outcome.OK and done.acked == 3
        assert await pending(redis) == 0
        assert await redis.xlen(KEYS.inbox(P)) == 0  # acknowledged inputs are deleted
        assert await redis.hgetall(KEYS.states(P)) == {b"7": STATE}
        assert await redis.zrange(KEYS.timers(P), 0, -1, withscores=True) == ((b"7", 1800.25),)
        entries = await redis.xrange(KEYS.outbox(P))
        assert done.outbox_ids == tuple(e.identifier for e in entries)
        assert await outbox(redis) == list(ROWS)
        (absorb,) = await redis.xrange(KEYS.inbox(2))
        assert dict(absorb.field_values) == ABSORB
        (dead,) = await redis.xrange(KEYS.dead_letters)
        assert dict(dead.field_values) == {b"reason": b"alias_registered", b"body": b"{}"}
        assert await redis.get(KEYS.round(P)) == b"5:1"

    async def test_without_the_lease_nothing_is_written(self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(TOKEN))
        ids = await delivered(redis, 3)
        commits = Commits(redis, KEYS)
        await redis.delete([KEYS.lease(P)])
        assert (await commits.commit(P, TOKEN, 1, a_round(ids))).outcome is Outcome.FENCED
        await redis.set(KEYS.lease(P), str(TOKEN + 1))
        assert (await commits.commit(P, TOKEN, 1, a_round(ids))).outcome is Outcome.FENCED
        assert await nothing_written(redis)
        assert await pending(redis) == 3

    async def test_a_wrong_key_type_fails_before_any_write(
            self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(TOKEN))
        ids = await delivered(redis, 3)
        await redis.set(KEYS.timers(P), "not a sorted set")
        with pytest.raises(ResponseError, match="expected a zset"):
            await Commits(redis, KEYS).commit(P, TOKEN, 1, a_round(ids))
        await redis.delete([KEYS.timers(P)])
        assert await nothing_written(redis)
        assert await pending(redis) == 3

    def test_bad_arguments_are_refused_before_redis(self) -> None:
        with pytest.raises(ValueError, match=r"partition 4 is outside 0\.\.3"):
            commit_call(KEYS, P, TOKEN, 1, RoundWrites(handoffs=[(4, ABSORB)]))
        with pytest.raises(ValueError, match="deadline is inf"):
            commit_call(KEYS, P, TOKEN, 1, RoundWrites(timers={7: float("inf")}))
        with pytest.raises(ValueError, match="start at 1"):
            commit_call(KEYS, P, TOKEN, 0, RoundWrites())


class TestIdempotence:
    """A round id is committed once: a second run of the same commit answers DUP."""

    async def test_the_same_round_twice_writes_once(self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(TOKEN))
        ids = await delivered(redis, 3)
        commits = Commits(redis, KEYS)
        assert (await commits.commit(P, TOKEN, 4, a_round(ids))).outcome is Outcome.OK
        assert (await commits.commit(P, TOKEN, 4, a_round(ids))).outcome is Outcome.DUP
        assert (await commits.commit(P, TOKEN, 3, a_round(ids))).outcome is Outcome.DUP
        assert await outbox(redis) == list(ROWS)
        assert await redis.xlen(KEYS.inbox(2)) == 1
        assert await redis.xlen(KEYS.dead_letters) == 1
        assert (await commits.commit(P, TOKEN, 5, RoundWrites(outbox=ROWS[:1]))).outcome \
            is Outcome.OK
        assert await outbox(redis) == [*ROWS, ROWS[0]]

    async def test_a_new_owner_numbers_its_rounds_afresh(
            self, redis: coredis.Redis[bytes]) -> None:
        commits = Commits(redis, KEYS)
        await redis.set(KEYS.lease(P), str(TOKEN))
        assert (await commits.commit(P, TOKEN, 9, RoundWrites(outbox=ROWS))).outcome is Outcome.OK
        await redis.set(KEYS.lease(P), str(TOKEN + 1))
        assert (await commits.commit(P, TOKEN + 1, 1, RoundWrites(outbox=ROWS))).outcome \
            is Outcome.OK
        assert await redis.get(KEYS.round(P)) == b"6:1"

    async def test_a_commit_retried_by_the_client_is_dup(
            self, redis_url: str, redis: coredis.Redis[bytes]) -> None:
        """The hazard of the scale-out design's section 7, reproduced step by step."""
        runs, reply = await ambiguous_commit(redis_url, redis, source("commit"))
        assert runs == 2  # the server ran the script twice...
        assert reply.outcome is Outcome.DUP  # ...and the second run wrote nothing
        assert await outbox(redis) == list(ROWS)
        assert await redis.xlen(KEYS.inbox(2)) == 1

    async def test_without_the_round_check_the_retry_doubles_the_round(
            self, redis_url: str, redis: coredis.Redis[bytes]) -> None:
        """The same steps against a commit script without its round check: the test can fail."""
        check = "if last_token == tonumber(token) and last_round >= round then return {'DUP'} end"
        unchecked = source("commit").replace(check, "")
        assert unchecked != source("commit")
        runs, reply = await ambiguous_commit(redis_url, redis, unchecked)
        assert runs == 2
        assert reply.outcome is Outcome.OK  # the caller sees one success...
        assert await outbox(redis) == [*ROWS, *ROWS]  # ...of a round written twice


async def ambiguous_commit(redis_url: str, redis: coredis.Redis[bytes],
                           script_source: str) -> tuple[int, Committed]:
    """Commit a round whose first run succeeds but whose reply is lost, so the client retries.

    The client multiplexes requests on a connection. A blocking read takes the connection
    the commit was sent on; the server runs the commit, but its reply is held in the
    network; the read is cancelled, so the client drops the connection, fails the commit
    with a connection error and retries it on a new one. Returns the script's run count
    and what the caller saw.
    """
    await redis.set(KEYS.lease(P), str(TOKEN))
    script_keys, args = commit_call(KEYS, P, TOKEN, 1, a_round(await delivered(redis, 3)))
    await redis.script_load(script_source)  # no NOSCRIPT round trip through the gate
    await redis.config_resetstat()
    seen: list[Committed] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            gate = Gate(port_of(redis_url))
            await nursery.start(gate.serve)
            async with coredis.Redis.from_url(gate.url) as gated:
                script = gated.register_script(script_source)
                await gated.ping()  # the client's one connection so far
                gate.hold(up=False, down=True)  # replies stop on the way back

                async def commit() -> None:
                    seen.append(parse_commit(await script(script_keys, args)))

                nursery.start_soon(commit)
                await until(lambda: redis.exists([KEYS.round(P)]))  # the first run is done
                read = trio.CancelScope()
                read_ended = trio.Event()

                async def blocking_read() -> None:
                    with read:
                        await gated.xread({"elsewhere": "$"}, block=10_000)
                    read_ended.set()

                nursery.start_soon(blocking_read)
                await until(lambda: blocked_clients(redis))  # it shares the commit's connection
                read.cancel()
                await read_ended.wait()
                await until(lambda: gate.connections == 2)  # the retry's new connection
                gate.open()
                await until(lambda: seen)
            nursery.cancel_scope.cancel()
    stats: Any = await redis.info("commandstats")
    return int(stats["cmdstat_evalsha"]["calls"]), seen[0]


async def blocked_clients(redis: coredis.Redis[bytes]) -> int:
    info: Any = await redis.info("clients")
    return int(info["blocked_clients"])


async def started(nursery: trio.Nursery,
                  run: Callable[..., Awaitable[None]]) -> trio.CancelScope:
    """Start ``run`` (a ``task_status`` function) under a scope of its own, to stop it alone."""
    scope = trio.CancelScope()

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await run(task_status=task_status)

    await nursery.start(runner)
    return scope


class TestZombie:
    """A worker that stalled past its lease wakes up to FENCED, and its round is nowhere."""

    async def test_a_stalled_workers_commit_is_fenced(
            self, redis_url: str, redis: coredis.Redis[bytes]) -> None:
        keys = Keys("proj", 2)
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                gate = Gate(port_of(redis_url))
                await nursery.start(gate.serve)
                async with coredis.Redis.from_url(gate.url) as gated:
                    a = Leases(gated, keys, worker="a", ttl=0.6)
                    a_scope = await started(nursery, a.run)
                    lease_a = {lease.partition: lease for lease in (a.gained.receive_nowait(),
                                                                    a.gained.receive_nowait())}[0]
                    ids = await delivered(gated, 3, lease_a.token, keys, 0)
                    gate.hold()  # a stalls: its renewals and its commit wait in the network
                    seen: list[Committed] = []

                    async def commit() -> None:
                        seen.append(await Commits(gated, keys).commit(
                            0, lease_a.token, 1, a_round(ids, keys, target=1)))

                    nursery.start_soon(commit)
                    await lease_a.wait_lost()
                    assert lease_a.why == "expired"
                    assert await redis.get(keys.lease(0)) == b"%d" % lease_a.token

                    b = Leases(redis, keys, worker="b", ttl=0.6)
                    b_scope = await started(nursery, b.run)
                    lease_b: Lease = await b.gained.receive()  # only once a's lease expired
                    while lease_b.partition != 0:
                        lease_b = await b.gained.receive()
                    assert lease_b.token > lease_a.token
                    inherited = await Inbox(redis, keys, 0).recover(lease_b.token)
                    assert [entry.id for entry in inherited] == ids

                    gate.open()  # a wakes up: its commit reaches Redis now
                    await until(lambda: seen)
                    assert seen[0].outcome is Outcome.FENCED
                    assert await nothing_written(redis, keys, 0, target=1)
                    assert await pending(redis, keys, 0) == 3
                    with pytest.raises(Fenced):
                        await Inbox(gated, keys, 0).read(lease_a.token)
                    a_scope.cancel()

                done = await Commits(redis, keys).commit(0, lease_b.token, 1,
                                                         RoundWrites(acks=ids, outbox=ROWS))
                assert (done.outcome, done.acked) == (Outcome.OK, 3)
                b_scope.cancel()
                nursery.cancel_scope.cancel()


class TestFinish:
    """The sender deletes finished entries and dead-letters expired ones, once, while owner."""

    async def test_finish_deletes_and_dead_letters_once(self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(TOKEN))
        commits = Commits(redis, KEYS)
        first, second = (await commits.commit(P, TOKEN, 1, RoundWrites(outbox=ROWS))).outbox_ids
        for _ in range(2):  # a retried finish changes nothing more
            await commits.finish(P, TOKEN, done=[first], dead=[(second, "expired")])
        assert await redis.xlen(KEYS.outbox(P)) == 0
        (dead,) = await redis.xrange(KEYS.dead_letters)
        assert dict(dead.field_values) == {**ROWS[1].fields(), b"reason": b"expired",
                                           b"partition": b"1", b"entry": second}

    async def test_finish_is_fenced(self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(TOKEN))
        commits = Commits(redis, KEYS)
        first, second = (await commits.commit(P, TOKEN, 1, RoundWrites(outbox=ROWS))).outbox_ids
        await redis.set(KEYS.lease(P), str(TOKEN + 1))
        finished = await commits.finish(P, TOKEN, done=[first], dead=[(second, "expired")])
        assert finished.outcome is Outcome.FENCED
        assert await redis.xlen(KEYS.outbox(P)) == 2
        assert not await redis.exists([KEYS.dead_letters])
