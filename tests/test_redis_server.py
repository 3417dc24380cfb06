"""The shipped Redis configuration gives the durability the README promises."""

from __future__ import annotations

from pathlib import Path

import coredis
import pytest

from .redisserver import RedisServer

pytestmark = pytest.mark.redis


async def test_shipped_config_fsyncs_every_write_and_never_evicts(redis_url: str) -> None:
    async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
        config = await client.config_get(["appendonly", "appendfsync", "maxmemory-policy"])
        assert config == {"appendonly": "yes", "appendfsync": "always",
                          "maxmemory-policy": "noeviction"}
        await client.xadd("in", {"b": "x"})
        assert await client.xlen("in") == 1


def test_a_write_survives_kill_9(tmp_path: Path, redis_server: RedisServer) -> None:
    server = RedisServer(tmp_path / "r")
    server.start()
    try:
        assert server.cli("SET", "acked", "1") == "OK"
        server.stop(hard=True)
        server.start()
        assert server.cli("GET", "acked") == "1"
    finally:
        server.stop()
