"""A partition's owner in the Redis mode when its lease is in doubt: it gives the partition
up without taking the process down, and it posts nothing it can no longer vouch for."""

from __future__ import annotations

import time
from pathlib import Path

import coredis
import httpx
import pytest
import trio

from router import outbox
from router.broadcast import Broadcast
from router.cluster.keys import Keys
from router.cluster.leases import Lease
from router.cluster.node import open_cluster
from router.cluster.schema import SharedSchema
from router.cluster.worker import PartitionTask, WorkerSettings
from router.commands import Command
from router.infinario import Legacy
from router.mapping import EventPolicy, Limits
from router.metrics import Metrics
from router.spool import Spool

from .cluster_support import until
from .conftest import PROJECT, WRITE_KEY, FakeInfinario, relay_config

pytestmark = pytest.mark.redis


async def test_a_fenced_partition_is_given_up_and_the_relay_carries_on(redis_url: str) -> None:
    """Another token in the lease (a takeover while this worker stalled) makes the owner's
    next read FENCED: the partition is dropped, the process keeps running, and it takes the
    partition again once the lease is free."""
    infinario = FakeInfinario()
    keys = Keys(PROJECT, 1)
    config = relay_config(Path("/nonexistent"), redis=redis_url, partitions=1, linger=0.0)
    async with coredis.Redis.from_url(redis_url) as client, open_cluster(
            config, http=True, transport=httpx.MockTransport(infinario.handler)) as router:
        with trio.fail_after(10):
            await until(lambda: router.health()["partitions_held"] == 1)
            await client.set(keys.lease(0), "999999", px=60_000)
            await until(lambda: router.health()["partitions_held"] == 0)
            await trio.sleep(0.5)  # it must stay up meanwhile
            assert router.running
            await client.delete([keys.lease(0)])
            await until(lambda: router.health()["partitions_held"] == 1)
            async with httpx.AsyncClient(base_url=router.url or "", auth=(WRITE_KEY, "")) as http:
                sent = await http.post("/v1/track", json={"userId": "u1", "event": "Back"})
                assert sent.status_code == 200
            await until(lambda: len(infinario.commands) == 1)


@pytest.mark.parametrize("trusted", [True, False])
async def test_a_partition_posts_only_while_its_lease_is_trusted(
        redis_url: str, trusted: bool) -> None:
    """An owner resumed after a pause past its lease (its trust ran out while it was stopped)
    must not post what it held: the next owner sends it, and a late copy could land after
    that owner's newer commands."""
    infinario = FakeInfinario()
    keys = Keys(PROJECT, 1)
    legacy = Legacy()
    async with coredis.Redis.from_url(redis_url) as client:
        await client.set(keys.lease(0), "1")  # reads are fenced by the token in Redis
        wire = legacy.encode(Command("event", PROJECT, {"registered": "u1"}, {}, 1.0, "held"))
        await client.xadd(keys.outbox(0), {
            b"lane": b"0", b"body": outbox.encode_body([wire]), b"count": b"1",
            b"customers": outbox.pack_customers([1]), b"first_at": repr(time.time()).encode()})
        settings = WorkerSettings(
            policy=EventPolicy(), limits=Limits(), session_timeout=1200.0, dialect=legacy,
            base_url="http://infinario.test",
            transport=httpx.MockTransport(infinario.handler), request_timeout=0.05,
            retry_window=3600.0, bucket=None, lane_window=500, linger=0.0,
            active_customers=1000)
        now = trio.current_time()
        lease = Lease(0, 1, now + 60 if trusted else now - 1, lambda: None)
        task = PartitionTask(client, keys, lease, SharedSchema(keys, Limits()), settings,
                             Metrics(), time.time, Spool(2**40), Broadcast())
        with trio.move_on_after(1.0):
            await task.run()
    assert [c["data"]["type"] for c in infinario.commands] == (["held"] if trusted else [])
