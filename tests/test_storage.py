"""A full or failing disk: 503 at intake, nothing acknowledged lost, service resumes by itself."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router import open_router
from router import store as st
from router.storage import DiskUsage, StorageUnavailable, is_storage_error

from .conftest import WRITE_KEY, FakeInfinario, Relay, relay_config

WRITES = ("INSERT", "DELETE", "UPDATE", "COMMIT")


class FailingConnection:
    """A connection whose writes fail like a full disk while ``failing`` names them."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.failing: tuple[str, ...] = ()
        self.refused = 0

    def _check(self, sql: str) -> None:
        statement = sql.lstrip().upper()
        if any(statement.startswith(prefix) for prefix in self.failing):
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def track(n: int) -> dict[str, Any]:
    return {"type": "track", "userId": f"u{n % 7}", "event": "Stored", "messageId": f"m{n}",
            "properties": {"n": n}}


async def post(client: httpx.AsyncClient, n: int) -> httpx.Response:
    return await client.post("/v1/track", json=track(n), auth=(WRITE_KEY, ""))


async def eventually(check: Any, within: float = 10.0) -> None:
    """Poll ``check`` every 20 ms; fail after ``within`` seconds."""
    for _ in range(int(within / 0.02)):
        if check():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"not true within {within} s")


class TestClassification:
    """SQLite's full-disk and I/O errors are storage conditions; other errors are not."""

    def test_full_and_io_errors_are_storage_errors(self) -> None:
        assert is_storage_error(sqlite3.OperationalError("database or disk is full"))
        assert is_storage_error(sqlite3.OperationalError("disk I/O error"))
        assert not is_storage_error(sqlite3.OperationalError("no such table: x"))
        assert not is_storage_error(ValueError("database or disk is full"))

    def test_disk_usage_counts_database_and_log_less_free_pages(self, tmp_path: Path) -> None:
        db = tmp_path / "router.db"
        db.write_bytes(b"x" * 5000)
        Path(f"{db}-wal").write_bytes(b"y" * 3000)
        clock = [0.0]
        usage = DiskUsage(db, cap=7000, reusable=lambda: 1000, clock=lambda: clock[0])
        assert usage.bytes == 7000 and usage.full
        Path(f"{db}-wal").unlink()
        assert usage.bytes == 7000  # measured again only after 100 ms
        clock[0] = 0.2
        assert usage.bytes == 4000 and not usage.full


class TestChain:
    """Ordered writes never overtake one that failed; each commits once its turn comes."""

    async def test_a_later_round_waits_for_a_failed_earlier_one(self, tmp_path: Path) -> None:
        conn = st.open_database(tmp_path / "t.db")
        conn.execute("CREATE TABLE log(n INTEGER)")
        store = st.Store(conn)
        failing = FailingConnection(conn)
        store.conn = failing  # type: ignore[assignment]
        chain = st.Chain()

        def write(n: int) -> Any:
            return lambda c: c.execute("INSERT INTO log(n) VALUES(?)", (n,))

        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            failing.failing = WRITES
            first = store.submit(write(1), chain=chain)
            with pytest.raises(StorageUnavailable):
                await first.result()
            assert store.failing
            failing.failing = ()
            second = store.submit(write(2), chain=chain)
            with pytest.raises(StorageUnavailable):  # out of turn: 1 has not committed
                await second.result()
            await store.settle(first)
            await store.settle(second)
            assert not store.failing
            nursery.cancel_scope.cancel()
        assert [n for (n,) in conn.execute("SELECT n FROM log")] == [1, 2]
        store.close()


@pytest.fixture
def failing(relay: Relay) -> FailingConnection:
    wrapped = FailingConnection(relay.router.store.conn)
    relay.router.store.conn = wrapped  # type: ignore[assignment]
    return wrapped


class TestWriteErrors:
    """Injected full-disk errors on every kind of write, through the real HTTP intake."""

    async def test_503_while_failing_then_everything_delivered(
        self, relay: Relay, failing: FailingConnection
    ) -> None:
        client = relay.client
        # Answers cannot be recorded: deliveries go on, the retirer keeps them.
        failing.failing = ("DELETE FROM OUTBOX", "UPDATE OUTBOX")
        for n in range(20):
            assert (await post(client, n)).status_code == 200
        await eventually(lambda: len(relay.infinario.commands) >= 20)
        await eventually(lambda: failing.refused > 0)
        # Rounds cannot commit: intake still journals, the partition keeps the rounds.
        failing.failing = ("DELETE FROM JOURNAL",)
        for n in range(20, 40):
            assert (await post(client, n)).status_code == 200
        # Nothing can be written: intake refuses with 503 and says when to retry.
        failing.failing = WRITES
        refused = []
        for n in range(40, 60):
            response = await post(client, n)
            assert response.status_code == 503
            assert response.headers["retry-after"]
            assert response.json()["code"] == "storage_unavailable"
            refused.append(n)
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["writable"] is False
        await trio.sleep(0.3)
        # Space is back: the client's retries pass and the kept work resumes.
        failing.failing = ()
        for n in refused:
            assert (await post(client, n)).status_code == 200
        events = await relay.events("Stored")
        assert sorted(e["properties"]["n"] for e in events) == list(range(60))
        assert (await client.get("/health")).json()["writable"] is True

        def left(c: sqlite3.Connection) -> tuple[int, int]:
            return (c.execute("SELECT COUNT(*) FROM journal").fetchone()[0],
                    c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

        await eventually(lambda: relay.router.sender.idle())
        assert await relay.router.store.call(left) == (0, 0)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True,
                       timeout=10)


def fill(path: Path, leave: int) -> None:
    """Take all the space of ``path``'s filesystem but ``leave`` bytes."""
    with open(path, "wb") as f, contextlib.suppress(OSError):
        for _ in range(10_000):
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    os.truncate(path, max(0, path.stat().st_size - leave))


class TestRealFullDisk:
    """A real filesystem that runs out of space: 503s, then 200s once space returns."""

    async def test_full_tmpfs(self, tmp_path: Path) -> None:
        with small_filesystem(tmp_path / "small", "4m") as disk:
            infinario = FakeInfinario()
            config = relay_config(disk / "data")
            async with open_router(
                config, http=True, transport=httpx.MockTransport(infinario.handler)
            ) as router:
                assert router.url is not None
                # Leave the relay a little room: a filler takes the rest.
                filler = disk / "filler"
                fill(filler, leave=96 * 1024)
                accepted: list[int] = []
                refused: list[int] = []
                big = "x" * 6000
                async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:
                    n = 0
                    while not refused and n < 2000:
                        message = {**track(n), "properties": {"n": n, "pad": f"{n}{big}"}}
                        response = await client.post("/v1/track", json=message,
                                                     auth=(WRITE_KEY, ""))
                        assert response.status_code in (200, 503), response.text
                        if response.status_code == 503:
                            assert response.json()["code"] == "storage_unavailable"
                            refused.append(n)
                        else:
                            accepted.append(n)
                        n += 1
                    assert refused, "the disk never filled"
                    filler.unlink()
                    for n in refused:
                        with trio.fail_after(10):
                            while True:
                                message = {**track(n), "properties": {"n": n}}
                                response = await client.post("/v1/track", json=message,
                                                             auth=(WRITE_KEY, ""))
                                if response.status_code == 200:
                                    break
                                await trio.sleep(0.1)
                        accepted.append(n)
                with trio.fail_after(20):
                    await router.drain()
                got = sorted(c["data"]["properties"]["n"] for c in infinario.commands
                             if c["name"] == "crm/events")
                assert got == sorted(accepted)
