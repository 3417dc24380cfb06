"""Fenced partition leases: a fair share per live worker, takeover only after a dead owner's TTL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import coredis
import pytest
import trio

from router.cluster.keys import Keys
from router.cluster.leases import Lease, Leases

from .cluster_support import Gate, port_of, until

pytestmark = pytest.mark.redis

PARTITIONS = 6
TTL = 0.6  # seconds: short enough for the tests, long enough for a loaded machine's round trips
KEYS = Keys("proj", PARTITIONS)


@dataclass
class Worker:
    """A ``Leases`` plus the partition tasks it feeds: each stops as soon as its lease is lost."""

    leases: Leases
    redis: coredis.Redis[bytes]  # a direct client, to look at Redis when a lease is lost
    gained: list[tuple[float, Lease]] = field(default_factory=list)
    # For each lost lease: its reason and the value its key held when the task learnt of it.
    lost: list[tuple[Lease, bytes | None]] = field(default_factory=list)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def partitions(self) -> set[int]:
        return set(self.leases.held())

    async def serve(self, nursery: trio.Nursery) -> None:
        async for lease in self.leases.gained:
            self.gained.append((trio.current_time(), lease))
            nursery.start_soon(self._task, lease)

    async def _task(self, lease: Lease) -> None:
        await lease.wait_lost()
        self.lost.append((lease, await self.redis.get(KEYS.lease(lease.partition))))
        lease.stopped()


@asynccontextmanager
async def cluster(redis_url: str) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Start workers with ``await start()``; all of them end with the block."""
    async with (coredis.Redis.from_url(redis_url) as direct, trio.open_nursery() as nursery):

        async def start(client: coredis.Redis[bytes] | None = None, name: str = "") -> Worker:
            worker = Worker(Leases(client or direct, KEYS, worker=name or None, ttl=TTL), direct)

            async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with worker.scope:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(worker.serve, inner)
                        await inner.start(worker.leases.run)
                        task_status.started()

            await nursery.start(run)
            return worker

        yield start
        nursery.cancel_scope.cancel()


async def tokens_in_redis(redis: coredis.Redis[bytes]) -> dict[int, int]:
    values = [await redis.get(KEYS.lease(p)) for p in range(PARTITIONS)]
    return {p: int(v) for p, v in enumerate(values) if v is not None}


async def expiries(redis: coredis.Redis[bytes], partitions: set[int]) -> dict[int, float]:
    """The earliest each lease can expire in Redis, on this process's clock."""
    found = {}
    for p in partitions:
        asked = trio.current_time()  # Redis read the TTL after this, to the millisecond
        remaining = await redis.pttl(KEYS.lease(p))
        assert remaining > 0
        found[p] = asked + (remaining - 1) / 1000
    return found


class TestFairShare:
    """Each live worker holds ceil(partitions / workers); a joining worker gets its share."""

    async def test_one_worker_takes_every_partition(self, redis_url: str) -> None:
        with trio.fail_after(10):
            async with cluster(redis_url) as start:
                a = await start(name="a")
                assert a.partitions() == set(range(PARTITIONS))
                tokens = {p: lease.token for p, lease in a.leases.held().items()}
                assert await tokens_in_redis(a.redis) == tokens
                assert len(set(tokens.values())) == PARTITIONS
                assert (a.leases.live, a.leases.share) == (1, PARTITIONS)

    async def test_a_second_worker_makes_the_first_give_up_half(self, redis_url: str) -> None:
        with trio.fail_after(10):
            async with cluster(redis_url) as start:
                a = await start(name="a")
                before = {p: lease.token for p, lease in a.leases.held().items()}
                b = await start(name="b")
                await until(lambda: len(a.partitions()) == len(b.partitions()) == 3)
                assert a.partitions() | b.partitions() == set(range(PARTITIONS))
                in_redis = await tokens_in_redis(a.redis)
                for worker in (a, b):
                    for p, lease in worker.leases.held().items():
                        assert in_redis[p] == lease.token
                # Cancel first, release after: each task learnt of the loss while the key
                # still held its token, and the taker drew a newer token.
                assert sorted(lease.partition for lease, _ in a.lost) == sorted(b.partitions())
                for lease, value in a.lost:
                    assert lease.why == "rebalance"
                    assert value == b"%d" % lease.token
                    assert in_redis[lease.partition] > before[lease.partition]


class TestTakeover:
    """A dead worker's partitions wait for its TTL; released ones are free at once."""

    async def test_a_dead_workers_partitions_are_taken_only_after_its_ttl(
            self, redis_url: str) -> None:
        with trio.fail_after(10):
            async with cluster(redis_url) as start:
                a = await start(name="a")
                b = await start(name="b")
                await until(lambda: len(a.partitions()) == len(b.partitions()) == 3)
                orphans = a.leases.held()
                a.scope.cancel()  # dies: no release, no more heartbeats
                expire_at = await expiries(b.redis, set(orphans))
                await until(lambda: not a.leases.held())
                assert {lease.why for lease in orphans.values()} == {"stopped"}
                # A newcomer wants its share at once (a's heartbeat still counts), but
                # a's leases are not free until their TTL ends.
                c = await start(name="c")
                await until(lambda: b.partitions() | c.partitions() == set(range(PARTITIONS)))
                await until(lambda: len(b.partitions()) == len(c.partitions()) == 3)
                # A lease is held before its worker's task has taken it off ``gained``.
                await until(lambda: set(orphans) <= {
                    lease.partition for worker in (b, c) for _, lease in worker.gained})
                taken = {lease.partition: at for worker in (b, c) for at, lease in worker.gained}
                for p in orphans:
                    assert taken[p] >= expire_at[p], f"partition {p} taken before its TTL"

    async def test_a_released_partition_is_taken_before_its_ttl(self, redis_url: str) -> None:
        with trio.fail_after(10):
            async with cluster(redis_url) as start:
                a = await start(name="a")
                b = await start(name="b")
                await until(lambda: len(a.partitions()) == len(b.partitions()) == 3)
                left = a.leases.held()
                expire_at = await expiries(b.redis, set(left))
                await a.leases.leave()
                assert {lease.why for lease in left.values()} == {"stopped"}
                # Released, not left to expire: no key holds a's tokens any more.
                in_redis = await tokens_in_redis(b.redis)
                assert all(in_redis.get(p) != lease.token for p, lease in left.items())
                assert await b.redis.zscore(KEYS.workers, "a") is None

                await until(lambda: b.partitions() == set(range(PARTITIONS)))
                await until(lambda: set(left) <= {lease.partition for _, lease in b.gained})
                taken = {lease.partition: at for at, lease in b.gained}
                for p in left:
                    assert taken[p] < expire_at[p], f"partition {p} waited for its TTL"


    async def test_a_partition_whose_task_ended_is_taken_again(self, redis_url: str) -> None:
        with trio.fail_after(10):
            async with cluster(redis_url) as start:
                a = await start(name="a")
                first = a.leases.held()[0]
                first.stopped()  # its task ended without being asked to
                await until(lambda: len(a.gained) == PARTITIONS + 1)
                assert first.why == "stopped"
                again = a.leases.held()[0]
                assert again is not first and again.token > first.token
                assert (await tokens_in_redis(a.redis))[0] == again.token


class TestLocalLoss:
    """A worker that cannot renew stops trusting its lease before Redis lets it expire."""

    async def test_an_unrenewable_lease_is_lost_locally_before_it_expires(
            self, redis_url: str) -> None:
        with trio.fail_after(10):
            async with (cluster(redis_url) as start, trio.open_nursery() as nursery):
                gate = Gate(port_of(redis_url))
                await nursery.start(gate.serve)
                async with coredis.Redis.from_url(gate.url) as gated:
                    a = await start(gated, name="a")
                    held = {p: lease.token for p, lease in a.leases.held().items()}
                    assert held
                    gate.hold()  # a's renewals stop reaching Redis
                    await until(lambda: len(a.lost) == len(held))
                    for lease, value in a.lost:
                        assert lease.why == "expired"
                        assert value == b"%d" % lease.token  # Redis still had it
                        assert a.leases.token(lease.partition) is None
                    # ... and only now does Redis let it go.
                    b = await start(name="b")
                    await until(lambda: b.partitions() == set(held))
                    assert all(lease.token > held[p] for p, lease in b.leases.held().items())
                    gate.open()
                    a.scope.cancel()
                nursery.cancel_scope.cancel()


def test_lease_timing_must_leave_a_margin() -> None:
    with pytest.raises(ValueError, match="renew_every < trust < ttl"):
        Leases(coredis.Redis(), KEYS, ttl=1.0, trust=1.0)
