"""A new owner replays the partition's pending entries, then reads new ones; reads are fenced."""

from __future__ import annotations

from collections.abc import AsyncIterator

import coredis
import pytest
import trio

from router.cluster.commit import Commits, RoundWrites
from router.cluster.inbox import Fenced, Inbox, consumer
from router.cluster.keys import GROUP, Keys

pytestmark = pytest.mark.redis

KEYS = Keys("proj", 4)
P = 2
OLD, NEW = 5, 6  # the dead owner's token, the new owner's


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(redis_url) as client:
        yield client


async def route(redis: coredis.Redis[bytes], *names: bytes) -> list[bytes]:
    ids = [await redis.xadd(KEYS.inbox(P), {b"b": name}) for name in names]
    return [i for i in ids if i is not None]


class TestRecover:
    """The consumer is the partition, so a new owner inherits the old one's pending list."""

    async def test_a_new_owner_replays_the_dead_owners_entries_then_new_ones(
            self, redis_url: str, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(OLD))
        old = Inbox(redis, KEYS, P)
        await old.ensure_group()
        ids = await route(redis, b"m1", b"m2", b"m3", b"m4", b"m5")
        assert [e.id for e in (await old.read(OLD)).entries] == ids
        done = await Commits(redis, KEYS).commit(P, OLD, 1, RoundWrites(acks=ids[:2]))
        assert done.acked == 2
        # The old owner dies with m3..m5 pending; the lease passes to a new token.
        await redis.set(KEYS.lease(P), str(NEW))

        async with coredis.Redis.from_url(redis_url) as other:  # another worker
            new = Inbox(other, KEYS, P)
            assert new.consumer == consumer(P) == "p2"
            replay = await new.recover(NEW, count=2)  # pages of 2
            assert [(e.id, e.fields) for e in replay] == [
                (ids[2], {b"b": b"m3"}), (ids[3], {b"b": b"m4"}), (ids[4], {b"b": b"m5"})]
            nothing = await new.read(NEW)
            assert nothing.entries == [] and nothing.cursor == ids[-1]
            later = await route(redis, b"m6", b"m7")
            assert await new.wait(nothing.cursor, block=1.0)
            assert [e.id for e in (await new.read(NEW)).entries] == later
            with pytest.raises(Fenced):
                await old.read(OLD)
            with pytest.raises(Fenced):
                await old.recover(OLD)

    async def test_an_entry_deleted_while_pending_is_not_replayed(
            self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(OLD))
        inbox = Inbox(redis, KEYS, P)
        await inbox.ensure_group()
        ids = await route(redis, b"m1", b"m2", b"m3")
        await inbox.read(OLD)
        await redis.xdel(KEYS.inbox(P), [ids[1]])
        assert [e.id for e in await inbox.recover(OLD)] == [ids[0], ids[2]]
        assert [e.id for e in await inbox.recover(OLD)] == [ids[0], ids[2]]  # acked, not back

    async def test_entries_routed_before_the_group_existed_are_new(
            self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(OLD))
        ids = await route(redis, b"m1", b"m2")
        inbox = Inbox(redis, KEYS, P)
        assert await inbox.recover(OLD) == []  # creates the group, from the first entry
        await inbox.ensure_group()  # twice is fine
        assert [e.id for e in (await inbox.read(OLD)).entries] == ids
        groups = await redis.xinfo_groups(KEYS.inbox(P))
        assert [g[b"name"] for g in groups] == [GROUP.encode()]

    async def test_waiting_on_an_idle_partition_times_out(
            self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(OLD))
        inbox = Inbox(redis, KEYS, P)
        await inbox.ensure_group()
        empty = await inbox.read(OLD)
        assert empty.cursor == b"0-0"
        with trio.fail_after(5):
            assert not await inbox.wait(empty.cursor, block=0.05)


class TestLoad:
    """A new owner loads hibernated states on demand and the session timers that are due."""

    async def test_states_and_due_timers(self, redis: coredis.Redis[bytes]) -> None:
        await redis.set(KEYS.lease(P), str(OLD))
        await Commits(redis, KEYS).commit(P, OLD, 1, RoundWrites(
            states={7: b"\x00seven\xff", 9: b"nine"}, timers={7: 300.5, 9: 100.0, 4: 200.0}))
        inbox = Inbox(redis, KEYS, P)
        assert await inbox.load([7, 8, 9]) == {7: b"\x00seven\xff", 9: b"nine"}
        assert await inbox.load([]) == {}
        assert await inbox.due_timers(250.0) == [(100.0, 9), (200.0, 4)]
        assert await inbox.due_timers(limit=1) == [(100.0, 9)]
        assert await inbox.due_timers() == [(100.0, 9), (200.0, 4), (300.5, 7)]

