"""A relay process in the Redis mode, in this process: HTTP in, Infinario out.

The same requests go through the embedded relay and through the Redis mode, and
Infinario must hear the same commands, in the same order per customer.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router import open_router
from router.cluster.node import open_cluster
from router.errors import ConfigError, StartupError

from .conftest import WRITE_KEY, FakeInfinario, relay_config
from .redisserver import RedisServer, free_port

pytestmark = pytest.mark.redis


def requests(seed: int, count: int = 40) -> list[list[dict[str, Any]]]:
    """Batches over a few people and devices: anonymous browsing, sign-ups that merge
    it into a registered customer, shared devices, refused aliases, pages."""
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(6)]
    cookies = [f"c{i}" for i in range(10)]
    batches = []
    n = 0
    for _ in range(count):
        batch = []
        for _ in range(rng.randint(1, 8)):
            n += 1
            kind = rng.choice(["track", "track", "page", "identify", "identify", "alias"])
            message: dict[str, Any] = {"type": kind, "messageId": f"m{n}",
                                       "timestamp": f"2026-11-30T00:{n // 60 % 60:02}:"
                                                    f"{n % 60:02}Z"}
            if kind == "alias":
                message["userId"] = rng.choice(users)
                message["previousId"] = rng.choice(cookies + users)
            else:
                if rng.random() < 0.6:
                    message["anonymousId"] = rng.choice(cookies)
                if rng.random() < 0.5 or "anonymousId" not in message:
                    message["userId"] = rng.choice(users)
            if kind == "track":
                message["event"] = rng.choice(["Viewed", "Added", "Bought"])
                message["properties"] = {"n": n, "sku": rng.choice("abc")}
            elif kind == "page":
                message["name"] = rng.choice(["home", "cart"])
                message["properties"] = {"url": "https://shop.test/" + str(n)}
            elif kind == "identify":
                message["traits"] = {"plan": rng.choice(["free", "pro"]), "n": n}
            batch.append(message)
        batches.append(batch)
    return batches


async def send(url: str, batches: list[list[dict[str, Any]]]) -> int:
    accepted = 0
    async with httpx.AsyncClient(base_url=url, timeout=10, auth=(WRITE_KEY, "")) as client:
        for batch in batches:
            answer = await client.post("/v1/batch", json={"batch": batch})
            assert answer.status_code == 200, answer.text
            accepted += answer.json()["accepted"]
    return accepted


def canonical(command: dict[str, Any]) -> str:
    return json.dumps(command, sort_keys=True)


def by_registered(commands: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The commands of each registered customer, in the order Infinario got them: a
    registered id is one customer for good (never merged, never moved), so these are
    per-customer sequences in both modes."""
    out: dict[str, list[str]] = defaultdict(list)
    for command in commands:
        data = command["data"]
        ids = data.get("customer_ids") or data.get("ids") or {}
        if "registered" in ids:
            out[ids["registered"]].append(canonical(command))
    return dict(out)


async def wait_for(done: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``done`` every 20 ms, at most ``within`` seconds."""
    for _ in range(int(within / 0.02)):
        if done():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"not done within {within} s")


async def embedded(tmp_path: Path, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    infinario = FakeInfinario()
    config = relay_config(tmp_path / "embedded")
    async with open_router(config, http=True,
                           transport=httpx.MockTransport(infinario.handler)) as router:
        assert router.url is not None
        await send(router.url, batches)
        assert await router.drain(timeout=20)
    return infinario.commands


async def clustered(redis_url: str, batches: list[list[dict[str, Any]]],
                    partitions: int, expected: int) -> list[dict[str, Any]]:
    infinario = FakeInfinario()
    config = relay_config(Path("/nonexistent"), redis=redis_url, partitions=partitions,
                          linger=0.0)
    async with open_cluster(config, http=True,
                            transport=httpx.MockTransport(infinario.handler)) as router:
        assert router.url is not None
        await send(router.url, batches)
        await wait_for(lambda: len(infinario.commands) >= expected, within=20)
        await trio.sleep(0.2)  # nothing more may come
    return infinario.commands


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_redis_mode_delivers_what_the_embedded_relay_does(
        tmp_path: Path, redis_url: str, seed: int) -> None:
    batches = requests(seed)
    reference = await embedded(tmp_path, batches)
    got = await clustered(redis_url, batches, partitions=4, expected=len(reference))
    assert sorted(map(canonical, got)) == sorted(map(canonical, reference))
    assert by_registered(got) == by_registered(reference)


async def test_a_retried_request_is_not_delivered_twice(tmp_path: Path, redis_url: str) -> None:
    batches = requests(7, count=5)
    reference = await embedded(tmp_path, batches)
    got = await clustered(redis_url, batches + batches, partitions=2, expected=len(reference))
    assert sorted(map(canonical, got)) == sorted(map(canonical, reference))


async def test_unreachable_redis_is_a_startup_error(tmp_path: Path) -> None:
    config = relay_config(tmp_path, redis=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StartupError, match=r"redis: cannot reach redis://127\.0\.0\.1"):
        async with open_cluster(config):
            pass


async def test_the_partition_count_is_fixed_once_a_project_has_data(
        tmp_path: Path, redis_url: str) -> None:
    async with open_cluster(relay_config(tmp_path, redis=redis_url, partitions=4)):
        pass
    with pytest.raises(ConfigError, match="start with --partitions 4"):
        async with open_cluster(relay_config(tmp_path, redis=redis_url, partitions=8)):
            pass


async def test_intake_and_workers_run_apart(tmp_path: Path, redis_url: str) -> None:
    batches = requests(11, count=10)
    reference = await embedded(tmp_path, batches)
    infinario = FakeInfinario()
    transport = httpx.MockTransport(infinario.handler)
    base = {"redis": redis_url, "partitions": 4, "linger": 0.0}
    async with open_cluster(relay_config(tmp_path, role="intake", **base), http=True,
                            transport=transport) as intake, \
            open_cluster(relay_config(tmp_path, role="worker", **base), http=True,
                         transport=transport) as worker:
        assert intake.url is not None and worker.url is not None and not intake.workers
        async with httpx.AsyncClient(base_url=worker.url, auth=(WRITE_KEY, "")) as client:
            # A worker serves its operator endpoints, not Segment's.
            assert (await client.get("/health")).json()["role"] == "worker"
            assert (await client.post("/v1/batch", json={"batch": []})).status_code == 404
        await send(intake.url, batches)
        await wait_for(lambda: len(infinario.commands) >= len(reference), within=20)
    assert sorted(map(canonical, infinario.commands)) == sorted(map(canonical, reference))


async def test_a_lost_redis_gets_503_then_work_resumes(tmp_path: Path) -> None:
    """Never a 200 while Redis is down; what was acknowledged before is delivered after."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    infinario = FakeInfinario()
    config = relay_config(tmp_path, redis=server.url, partitions=2, linger=0.0)
    batches = requests(5, count=6)
    try:
        async with open_cluster(config, http=True,
                                transport=httpx.MockTransport(infinario.handler)) as router:
            assert router.url is not None
            await send(router.url, batches[:3])
            server.stop(hard=True)
            async with httpx.AsyncClient(base_url=router.url, timeout=10,
                                         auth=(WRITE_KEY, "")) as client:
                answer = await client.post("/v1/batch", json={"batch": batches[3]})
                assert answer.status_code == 503
                assert answer.headers["retry-after"]
                assert answer.json()["code"] == "storage_unavailable"
                health = (await client.get("/health")).json()
                assert health["status"] == "storage_unavailable"
            server.start()
            await send(router.url, batches[3:])
            expected = await embedded(tmp_path, batches)
            await wait_for(lambda: len(infinario.commands) >= len(expected), within=30)
        # At-least-once: a command in flight when Redis went away may come twice.
        assert set(map(canonical, infinario.commands)) == set(map(canonical, expected))
    finally:
        server.stop()


async def test_a_full_redis_refuses_whole_requests(tmp_path: Path, redis_url: str,
                                                   redis_server: RedisServer) -> None:
    config = relay_config(tmp_path, redis=redis_url, partitions=2, role="intake")
    async with open_cluster(config, http=True) as router:
        assert router.url is not None
        await send(router.url, requests(1, count=2))
        assert redis_server.cli("CONFIG", "SET", "maxmemory", "1") == "OK"
        try:
            before = redis_server.cli("EVAL", "local n = 0 for _, k in ipairs(redis.call("
                                      "'KEYS', 'in:*')) do n = n + redis.call('XLEN', k) end "
                                      "return n", "0")
            async with httpx.AsyncClient(base_url=router.url, timeout=10,
                                         auth=(WRITE_KEY, "")) as client:
                answer = await client.post("/v1/batch", json={"batch": requests(2)[0]})
            assert answer.status_code == 503 and answer.json()["code"] == "storage_unavailable"
            after = redis_server.cli("EVAL", "local n = 0 for _, k in ipairs(redis.call("
                                     "'KEYS', 'in:*')) do n = n + redis.call('XLEN', k) end "
                                     "return n", "0")
            assert after == before
        finally:
            assert redis_server.cli("CONFIG", "SET", "maxmemory", "0") == "OK"


async def test_an_unprocessable_entry_is_set_aside_and_the_partition_goes_on(
        tmp_path: Path, redis_url: str, redis_server: RedisServer) -> None:
    redis_server.cli("XADD", "in:{proj}:0", "*", "k", "2", "w", WRITE_KEY, "b", "not json")
    infinario = FakeInfinario()
    config = relay_config(tmp_path, redis=redis_url, partitions=1, linger=0.0)
    async with open_cluster(config, http=True,
                            transport=httpx.MockTransport(infinario.handler)) as router:
        assert router.url is not None
        await send(router.url, [[{"type": "track", "userId": "u", "event": "After",
                                  "messageId": "after"}]])
        await wait_for(lambda: bool(infinario.commands), within=10)
    assert infinario.commands[0]["data"]["type"] == "After"
    assert redis_server.cli("XLEN", "dl:{proj}") == "1"
    assert "unprocessable" in redis_server.cli("XRANGE", "dl:{proj}", "-", "+")


async def test_a_new_owner_sends_what_the_last_one_left_in_the_outbox(
        tmp_path: Path, redis_url: str) -> None:
    batches = requests(3, count=6)
    reference = await embedded(tmp_path, batches)
    down = httpx.MockTransport(lambda request: httpx.Response(503))
    config = relay_config(tmp_path, redis=redis_url, partitions=2, linger=0.0,
                          request_timeout=0.5)
    async with open_cluster(config, http=True, transport=down) as first:
        assert first.url is not None
        await send(first.url, batches)
        await wait_for(lambda: sum(len(task.sender.lanes[0].rows) for w in first.workers
                                   for task in w.tasks.values()) > 0)
    infinario = FakeInfinario()
    async with open_cluster(config, http=True,
                            transport=httpx.MockTransport(infinario.handler)):
        await wait_for(lambda: len(infinario.commands) >= len(reference))
    assert sorted(map(canonical, infinario.commands)) == sorted(map(canonical, reference))


async def test_a_session_open_on_a_moving_partition_ends_once(
        tmp_path: Path, redis_url: str) -> None:
    infinario = FakeInfinario()
    transport = httpx.MockTransport(infinario.handler)
    config = relay_config(tmp_path, redis=redis_url, partitions=2, linger=0.0,
                          session_timeout=1.0, request_timeout=0.2)
    page = {"type": "page", "userId": "u1", "name": "home", "messageId": "p1"}
    async with open_cluster(config, http=True, transport=transport) as first:
        assert first.url is not None
        await send(first.url, [[page]])
        await wait_for(lambda: len(infinario.commands) >= 2)  # session_start, page_visit
    # The first owner is gone before the deadline: the next one ends the session.
    async with open_cluster(config, http=True, transport=transport):
        await wait_for(lambda: any(c["data"].get("type") == "session_end"
                                   for c in infinario.commands), within=10)
        await trio.sleep(1.5)  # a second timer would have fired by now
    ends = [c for c in infinario.commands if c["data"].get("type") == "session_end"]
    assert len(ends) == 1
    assert ends[0]["data"]["customer_ids"] == {"registered": "u1"}


async def test_a_partition_given_back_cleanly_is_sent_at_once_by_its_next_owner(
        tmp_path: Path, redis_url: str) -> None:
    """A rebalance leaves nothing in flight: the taker need not wait --request-timeout."""
    down = httpx.MockTransport(lambda request: httpx.Response(503))
    infinario = FakeInfinario()
    config = relay_config(tmp_path, redis=redis_url, partitions=2, linger=0.0,
                          request_timeout=10.0)
    async with open_cluster(config, http=True, transport=down) as first:
        assert first.url is not None
        await send(first.url, requests(4, count=10))
        await wait_for(lambda: all(task.sender.lanes[0].rows for w in first.workers
                                   for task in w.tasks.values()))
        started = trio.current_time()
        async with open_cluster(config, http=True,
                                transport=httpx.MockTransport(infinario.handler)) as second:
            await wait_for(lambda: bool(infinario.commands), within=9)
            assert trio.current_time() - started < 5  # far less than the 10 s wait
            assert sum(len(w.tasks) for w in second.workers) == 1
