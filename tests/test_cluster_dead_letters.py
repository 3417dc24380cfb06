"""``dead-letters`` with ``--redis``: the dl:{project} streams listed, shown, replayed into
the customers' partitions and purged, through the real command."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import coredis
import pytest
from coredis.exceptions import ResponseError

from router.cluster.keys import GROUP, Keys
from router.cluster.letters import DeadId, DeadLetters
from router.cluster.scripts import source
from router.commands import Command, encode_command
from router.deadletters import when
from router.outbox import pack_customers

from .conftest import run_cli
from .redisserver import free_port

pytestmark = pytest.mark.redis

ALPHA, BETA = Keys("alpha", 16), Keys("beta", 16)
COMMAND = encode_command(Command("event", "alpha", {"registered": "u1"}, {"price": 3},
                                 1712345678.5, "purchase"))
FAILED = {b"kind": b"failed", b"project": b"alpha", b"k": b"21", b"command": COMMAND,
          b"status": b"error", b"errors": b'["simulated error", "again"]', b"attempts": b"3",
          b"first_at": b"1712345600.0", b"last_at": b"1712345700.0", b"at": b"1712345701.0"}
# As a worker writes a refusal of the project's limits (with k and at) ...
LIMITED = {b"code": b"too_many_event_types", b"reason": b"event type 'x' is over the limit",
           b"k": b"8", b"b": b'{"type":"track","event":"x"}', b"at": b"1712345702.0"}
# ... and as route.lua writes a refused alias (with the write key, without k and at).
ALIAS = {b"code": b"alias_registered", b"reason": b"u2 is already registered",
         b"w": b"writekey123", b"b": b'{"type":"alias","userId":"u2"}'}
EXPIRED = {b"lane": b"3", b"body": b'{"commands":[{"name":"crm/events"}]}', b"count": b"1",
           b"reason": b"retry window passed", b"partition": b"5", b"entry": b"1712345600000-0",
           b"customers": pack_customers([21]), b"first_at": b"1712345600.0"}
WORKERS_SEND = "replaying 1 dead letters: the running workers send them within seconds"
REFUSED_KEPT = ("1 refused messages were not replayed: the relay's rules refused them; "
                "resend them after changing the configuration")
EXPIRED_KEPT = ("1 expired outbox entries were not replayed: each is a request already encoded "
                "for Infinario, not commands to send again; read them with show")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(redis_url) as client:
        yield client


def cli(url: str | None, *args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    redis = ["--redis", url] if url else []
    return run_cli("dead-letters", *redis, *args, env=env, cwd=cwd)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a refusal, exit 2 and nothing on stdout."""
    assert (result.returncode, result.stdout) == (2, ""), result
    [line] = result.stderr.splitlines()
    assert line.startswith("infinario-router: ")
    return line


async def dead(redis: coredis.Redis[bytes], keys: Keys, fields: dict[bytes, bytes]) -> str:
    """Add a dead letter; its CLI id."""
    stream_id = await redis.xadd(keys.dead_letters, fields)
    assert stream_id is not None
    return f"{keys.project}/{stream_id.decode()}"


async def workers_ran(redis: coredis.Redis[bytes], keys: Keys) -> None:
    """The input streams a relay's workers create, one per partition they own."""
    for partition in range(keys.partitions):
        await redis.xgroup_create(keys.inbox(partition), GROUP, identifier="0", mkstream=True)


async def stream(redis: coredis.Redis[bytes], key: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(bytes(e.identifier).decode(), dict(e.field_values))
            for e in await redis.xrange(key, "-", "+")]


async def seed(redis: coredis.Redis[bytes]) -> list[str]:
    """All three formats across two projects, oldest first."""
    return [await dead(redis, ALPHA, FAILED), await dead(redis, ALPHA, LIMITED),
            await dead(redis, BETA, ALIAS), await dead(redis, BETA, EXPIRED)]


class TestListShowPurge:
    async def test_list_shows_every_format_across_projects(
            self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        failed, limited, alias, expired = await seed(redis)
        header, *lines = ok(cli(redis_url, "list")).splitlines()
        assert header.split() == ["id", "when", "project", "status", "tries", "reason"]
        assert [line.split("  ")[0].strip() for line in lines] == [failed, limited, alias,
                                                                    expired]
        rows = [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines]
        assert rows[0][1:] == ["2024-04-05T19:35:01+00:00", "alpha", "error", "3",
                               "simulated error; again"]
        assert rows[1][1:] == ["2024-04-05T19:35:02+00:00", "alpha", "refused", "0",
                               "too_many_event_types: event type 'x' is over the limit"]
        # Without ``at``, when Redis added the entry.
        millis = int(alias.split("/")[1].split("-")[0])
        assert rows[2][1:] == [when(millis / 1000), "beta", "refused", "0",
                               "alias_registered: u2 is already registered"]
        assert rows[3][2:] == ["beta", "expired", "-", "retry window passed"]

    async def test_limit_counts_the_rest(self, redis: coredis.Redis[bytes],
                                         redis_url: str) -> None:
        failed, limited, _, _ = await seed(redis)
        out = ok(cli(redis_url, "list", "--limit", "2")).splitlines()
        assert [line.split()[0] for line in out[1:3]] == [failed, limited]
        assert out[3:] == ["... 2 more (use --limit)"]

    async def test_show_each_format(self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        failed, limited, alias, expired = await seed(redis)
        shown = json.loads(ok(cli(redis_url, "show", failed)))
        assert shown == {
            "id": failed, "project": "alpha", "kind": "failed", "replayable": True,
            "created_at": "2024-04-05T19:35:01+00:00", "customer": 21, "status": "error",
            "errors": ["simulated error", "again"], "attempts": 3,
            "first_attempt": "2024-04-05T19:33:20+00:00",
            "last_attempt": "2024-04-05T19:35:00+00:00",
            "command": {"kind": "event", "project": "alpha", "ids": {"registered": "u1"},
                        "event_type": "purchase", "properties": {"price": 3},
                        "timestamp": 1712345678.5}}
        shown = json.loads(ok(cli(redis_url, "show", limited)))
        assert shown == {
            "id": limited, "project": "alpha", "kind": "refused", "replayable": False,
            "created_at": "2024-04-05T19:35:02+00:00", "customer": 8, "status": "refused",
            "errors": ["too_many_event_types: event type 'x' is over the limit"],
            "attempts": 0, "code": "too_many_event_types",
            "reason": "event type 'x' is over the limit",
            "message": {"type": "track", "event": "x"}}
        shown = json.loads(ok(cli(redis_url, "show", alias)))
        assert shown["message"] == {"type": "alias", "userId": "u2"}
        assert shown["write_key"] == "wri…"  # a credential: never shown whole
        assert "customer" not in shown
        shown = json.loads(ok(cli(redis_url, "show", expired)))
        del shown["created_at"]
        assert shown == {
            "id": expired, "project": "beta", "kind": "expired", "replayable": False,
            "status": "expired", "errors": ["retry window passed"],
            "reason": "retry window passed", "partition": 5, "entry": "1712345600000-0",
            "lane": 3, "count": 1, "customers": [21],
            "first_attempt": "2024-04-05T19:33:20+00:00",
            "body": {"commands": [{"name": "crm/events"}]}}

    async def test_an_entry_of_no_known_format_is_shown_and_kept(
            self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        other = await dead(redis, ALPHA, {b"note": b"written by hand"})
        [_, line] = ok(cli(redis_url, "list")).splitlines()
        assert line.split()[3:] == ["unknown", "-", "fields", "note"]
        shown = json.loads(ok(cli(redis_url, "show", other)))
        assert (shown["kind"], shown["replayable"], shown["fields"]) == (
            "unknown", False, {"note": "written by hand"})
        assert ok(cli(redis_url, "replay", other)).splitlines()[1] == (
            "1 dead letters were not replayed: not a failed command this version can read; "
            "read them with show")
        assert await redis.xlen(ALPHA.dead_letters) == 1

    async def test_show_unknown_id(self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        await seed(redis)
        result = cli(redis_url, "show", "alpha/1-0")
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == "infinario-router: no dead letter alpha/1-0\n"

    async def test_purge_ids_then_all(self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        failed, limited, alias, expired = await seed(redis)
        assert ok(cli(redis_url, "purge", failed, alias, "alpha/1-0")) == "purged 2 dead letters\n"
        assert [i for i, _ in await stream(redis, ALPHA.dead_letters)] == [limited.split("/")[1]]
        assert [i for i, _ in await stream(redis, BETA.dead_letters)] == [expired.split("/")[1]]
        assert ok(cli(redis_url, "purge", "--all")) == "purged 2 dead letters\n"
        assert await redis.xlen(ALPHA.dead_letters) == 0
        assert await redis.xlen(BETA.dead_letters) == 0
        assert ok(cli(redis_url, "list")) == "no dead letters\n"

    async def test_ids_are_checked_before_redis_is_asked(self, redis_url: str) -> None:
        for bad in ("5", "alpha", "alpha/x-1", "/1-0", "alpha/99999999999999999999-0"):
            line = refusal(cli(redis_url, "show", bad))
            assert f"dead letter id {bad!r}: expected PROJECT/STREAM-ID" in line
        assert refusal(cli(redis_url, "purge")) == \
            "infinario-router: name dead letter ids or pass --all"


class TestReplay:
    async def test_moves_a_failed_command_to_its_partition_once(
            self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        await workers_ran(redis, ALPHA)
        failed, limited, _, expired = await seed(redis)
        out = ok(cli(redis_url, "replay", failed, limited, expired))
        assert out.splitlines() == [WORKERS_SEND, REFUSED_KEPT, EXPIRED_KEPT]
        # Customer 21 of 16 partitions: partition 5, one entry, exactly these fields.
        [(_, fields)] = await stream(redis, ALPHA.inbox(5))
        assert fields == {b"k": b"21", b"c": b"replay", b"command": COMMAND}
        for partition in set(range(16)) - {5}:
            assert await redis.xlen(ALPHA.inbox(partition)) == 0
        left = [f"alpha/{i}" for i, _ in await stream(redis, ALPHA.dead_letters)]
        assert left == [limited]  # the refused one stays, the failed one left
        assert await redis.xlen(BETA.dead_letters) == 2

        again = ok(cli(redis_url, "replay", failed))
        assert again.splitlines() == [
            "replaying 0 dead letters: the running workers send them within seconds",
            "1 dead letters were not found: replayed or purged already"]
        assert await redis.xlen(ALPHA.inbox(5)) == 1

    async def test_all_across_projects_with_their_partitions(
            self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        alpha, beta = Keys("alpha", 4), Keys("beta", 4)
        await workers_ran(redis, alpha)
        await workers_ran(redis, beta)
        await seed(redis)
        other = {**FAILED, b"project": b"beta", b"k": b"7"}
        await dead(redis, beta, other)
        out = ok(cli(redis_url, "replay", "--all", "--partitions", "4"))
        assert out.splitlines() == [
            "replaying 2 dead letters: the running workers send them within seconds",
            REFUSED_KEPT.replace("1", "2", 1), EXPIRED_KEPT]
        assert [f for _, f in await stream(redis, alpha.inbox(1))] == [  # 21 % 4
            {b"k": b"21", b"c": b"replay", b"command": COMMAND}]
        assert [f for _, f in await stream(redis, beta.inbox(3))] == [  # 7 % 4
            {b"k": b"7", b"c": b"replay", b"command": COMMAND}]
        assert await redis.xlen(alpha.dead_letters) == 1
        assert await redis.xlen(beta.dead_letters) == 2

    async def test_refuses_partitions_the_relay_does_not_run(
            self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        await workers_ran(redis, ALPHA)  # 16 partitions
        failed, *_ = await seed(redis)
        for given in ("4", "32"):
            line = refusal(cli(redis_url, "replay", failed, "--partitions", given))
            assert line == (
                f"infinario-router: partitions: project 'alpha' has input streams up to "
                f"partition 15, so its relay runs 16 partitions, not {given}; pass the "
                "relay's --partitions (ROUTER_PARTITIONS, the config's partitions)")
        assert await redis.xlen(ALPHA.dead_letters) == 2
        assert sum([await redis.xlen(ALPHA.inbox(p)) for p in range(16)]) == 0

    async def test_the_count_the_relay_recorded_decides(
            self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        await redis.hset(ALPHA.meta, {"partitions": "8"})  # as the relay's first start did
        failed, *_ = await seed(redis)
        line = refusal(cli(redis_url, "replay", failed, "--partitions", "16"))
        assert line == ("infinario-router: partitions: project 'alpha' runs 8 partitions, "
                        "not 16; pass the relay's --partitions (ROUTER_PARTITIONS, the "
                        "config's partitions)")
        ok(cli(redis_url, "replay", failed, "--partitions", "8"))
        assert await redis.xlen(ALPHA.dead_letters) == 1

    async def test_a_command_that_does_not_decode_stays(
            self, redis: coredis.Redis[bytes], redis_url: str) -> None:
        # It would stop its partition's worker at every read.
        broken = await dead(redis, ALPHA, {**FAILED, b"command": b"[not a command"})
        out = ok(cli(redis_url, "replay", broken)).splitlines()
        assert out[1] == ("1 dead letters were not replayed: not a failed command this "
                          "version can read; read them with show")
        assert await redis.xlen(ALPHA.dead_letters) == 1


class TestReplayScript:
    """replay.lua: one atomic move, nothing for an id already gone, only the right partition."""

    async def test_moves_once(self, redis: coredis.Redis[bytes]) -> None:
        letters = DeadLetters(redis, 16)
        dead_id = DeadId.parse(await dead(redis, ALPHA, FAILED))
        letter = await letters.get(dead_id)
        assert letter is not None
        added = await letters.replay(letter)
        assert added is not None
        assert await stream(redis, ALPHA.inbox(5)) == [
            (added.decode(), {b"k": b"21", b"c": b"replay", b"command": COMMAND})]
        assert await letters.replay(letter) is None  # gone: nothing written
        assert await redis.xlen(ALPHA.inbox(5)) == 1

    async def test_checks_the_customer_and_the_kind(self, redis: coredis.Redis[bytes]) -> None:
        letters = DeadLetters(redis, 16)
        failed = DeadId.parse(await dead(redis, ALPHA, FAILED))
        refused = DeadId.parse(await dead(redis, ALPHA, LIMITED))
        script = redis.register_script(source("replay"))
        with pytest.raises(ResponseError, match="belongs to customer 21, not 22"):
            await script([ALPHA.dead_letters, ALPHA.inbox(6)], [failed.stream_id, "22"])
        with pytest.raises(ResponseError, match="is not a failed command"):
            await script([ALPHA.dead_letters, ALPHA.inbox(0)], [refused.stream_id, "8"])
        assert await redis.xlen(ALPHA.dead_letters) == 2
        assert not await redis.exists([ALPHA.inbox(6), ALPHA.inbox(0)])
        assert await letters.get(failed) is not None


class TestSettings:
    """--redis, else ROUTER_REDIS, else the config's redis; unreachable is one line."""

    async def test_flag_beats_environment_beats_config(
            self, redis: coredis.Redis[bytes], redis_url: str, tmp_path: Path) -> None:
        base = redis_url.rsplit("/", 1)[0]
        for db in (1, 2, 3):
            async with coredis.Redis.from_url(f"{base}/{db}") as client:
                await dead(client, Keys(f"db{db}", 16), FAILED)
        toml = tmp_path / "relay.toml"
        toml.write_text(f'redis = "{base}/3"\npartitions = 16\n'
                        'write_key_file = "missing-on-this-host"\n')

        def listed(*args: str, env: dict[str, str] | None = None) -> list[str]:
            lines = ok(cli(None, *args, "list", env=env, cwd=tmp_path)).splitlines()[1:]
            return [line.split()[2] for line in lines]

        env = {"ROUTER_REDIS": f"{base}/2"}
        assert listed("--config", str(toml)) == ["db3"]
        assert listed(env={"ROUTER_CONFIG": str(toml)}) == ["db3"]
        assert listed("--config", str(toml), env=env) == ["db2"]
        assert listed("--config", str(toml), "--redis", f"{base}/1", env=env) == ["db1"]
        # After the action too, like --data-dir.
        lines = ok(cli(None, "list", "--redis", f"{base}/1", env=env)).splitlines()
        assert lines[1].split()[2] == "db1"

    async def test_partitions_from_the_config(self, redis: coredis.Redis[bytes],
                                              redis_url: str, tmp_path: Path) -> None:
        toml = tmp_path / "relay.toml"
        toml.write_text(f'redis = "{redis_url}"\npartitions = 4\n')
        failed = await dead(redis, ALPHA, FAILED)
        ok(cli(None, "replay", failed, "--config", str(toml)))
        assert await redis.xlen(Keys("alpha", 4).inbox(1)) == 1  # 21 % 4
        failed = await dead(redis, BETA, {**FAILED, b"project": b"beta"})
        ok(cli(None, "replay", failed, "--config", str(toml),
               env={"ROUTER_PARTITIONS": "8"}))
        assert await redis.xlen(Keys("beta", 8).inbox(5)) == 1  # 21 % 8: environment wins
        failed = await dead(redis, Keys("gamma", 2), {**FAILED, b"project": b"gamma"})
        ok(cli(None, "replay", failed, "--config", str(toml), "--partitions", "2",
               env={"ROUTER_PARTITIONS": "8"}))
        assert await redis.xlen(Keys("gamma", 2).inbox(1)) == 1  # 21 % 2: the flag wins

    def test_unreachable_redis_is_one_line(self) -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        for args in (("list",), ("show", "alpha/1-0"), ("replay", "--all"), ("purge", "--all")):
            line = refusal(cli(url, *args))
            assert line.startswith(f"infinario-router: redis: cannot reach {url} (")
        line = refusal(cli(None, "list", env={"ROUTER_REDIS": url}))
        assert "cannot reach" in line

    def test_bad_settings_are_one_line(self, tmp_path: Path, redis_url: str) -> None:
        assert refusal(cli("nope", "list")) == \
            "infinario-router: redis: expected redis://HOST:PORT/DB, got 'nope'"
        assert refusal(cli(redis_url, "list", "--partitions", "0")) == \
            "infinario-router: partitions: expected 1 to 1024, got 0"
        assert "drop --data-dir or the Redis setting" in refusal(
            cli(redis_url, "list", "--data-dir", str(tmp_path)))
        # A data dir's ids are numbers.
        assert "numeric ids" in refusal(cli(None, "show", "alpha/1-0",
                                            "--data-dir", str(tmp_path)))
