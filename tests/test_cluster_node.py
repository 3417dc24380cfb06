"""A relay process in the Redis mode, in this process: HTTP in, Infinario out.

The same requests go through the embedded relay and through the Redis mode, and
Infinario must hear the same commands, in the same order per customer.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router import open_router
from router.cluster.node import open_cluster
from router.errors import ConfigError, StartupError

from .conftest import WRITE_KEY, FakeInfinario, relay_config
from .redisserver import free_port

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
        with trio.fail_after(20):
            while len(infinario.commands) < expected:
                await trio.sleep(0.02)
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
    with pytest.raises(StartupError, match="redis: cannot reach redis://127.0.0.1"):
        async with open_cluster(config):
            pass


async def test_the_partition_count_is_fixed_once_a_project_has_data(
        tmp_path: Path, redis_url: str) -> None:
    async with open_cluster(relay_config(tmp_path, redis=redis_url, partitions=4)):
        pass
    with pytest.raises(ConfigError, match="start with --partitions 4"):
        async with open_cluster(relay_config(tmp_path, redis=redis_url, partitions=8)):
            pass
