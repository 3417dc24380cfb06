"""The real CLI: serve, SIGTERM, startup errors, dead-letter management."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from router.simulator import Simulator, run_simulator

from .harness import eventually
from .processes import RelayProcess


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True,
                          text=True, timeout=60)


async def track(url: str, event: str, key: str = "crash-key") -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{url}/v1/track", auth=(key, ""),
                                 json={"userId": "u1", "event": event})


class TestServe:
    """``serve`` answers, stops on SIGTERM with exit 0, and refuses an unusable data dir."""

    async def test_sigterm_drains_and_exits_zero(self, tmp_path: Path) -> None:
        sim = Simulator()
        async with trio.open_nursery() as nursery:
            sim_url = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            relay = RelayProcess(tmp_path / "data", sim_url)
            try:
                url = await trio.to_thread.run_sync(relay.start)
                response = await track(url, "Before Stop")
                assert response.status_code == 200
                assert response.json() == {"success": True}
                assert await trio.to_thread.run_sync(relay.terminate) == 0
            finally:
                relay.kill()
            assert [e["type"] for e in sim.events] == ["Before Stop"]
            nursery.cancel_scope.cancel()

    async def test_second_instance_on_same_data_dir_is_refused(self, tmp_path: Path) -> None:
        relay = RelayProcess(tmp_path / "data", "http://127.0.0.1:9")
        try:
            await trio.to_thread.run_sync(relay.start)
            result = await trio.to_thread.run_sync(
                lambda: cli("serve", "--data-dir", str(tmp_path / "data"), "--write-key", "a=b",
                            "--listen", "127.0.0.1:0"))
            assert result.returncode != 0
            assert "in use by another infinario-router" in result.stderr.strip().splitlines()[-1]
        finally:
            relay.kill()

    def test_corrupt_database_is_refused(self, tmp_path: Path) -> None:
        data = tmp_path / "data"
        data.mkdir()
        (data / "router.db").write_bytes(b"this is not a database" * 100)
        result = cli("serve", "--data-dir", str(data), "--write-key", "a=b",
                     "--listen", "127.0.0.1:0")
        assert result.returncode != 0
        line = result.stderr.strip().splitlines()[-1]
        assert "router.db" in line and "move it aside" in line

    def test_unwritable_data_dir_is_refused(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        result = cli("serve", "--data-dir", str(blocker / "sub"), "--write-key", "a=b",
                     "--listen", "127.0.0.1:0")
        assert result.returncode != 0
        assert "data dir" in result.stderr.strip().splitlines()[-1]


class TestDeadLetters:
    """Dead letters can be listed, shown, replayed through the normal path and purged."""

    async def test_list_show_replay_purge(self, tmp_path: Path) -> None:
        sim = Simulator()
        data = tmp_path / "data"
        async with trio.open_nursery() as nursery:
            sim_url = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            sim.fail_commands("error", count=2)
            relay = RelayProcess(data, sim_url)
            try:
                url = await trio.to_thread.run_sync(relay.start)
                assert (await track(url, "First")).status_code == 200
                assert (await track(url, "Second")).status_code == 200
                async def two_dead() -> bool:
                    listing = await trio.to_thread.run_sync(
                        lambda: cli("dead-letters", "--data-dir", str(data), "list"))
                    return listing.stdout.count("simulated error") == 2

                await eventually(two_dead, within=20)
                listing = cli("dead-letters", "--data-dir", str(data), "list").stdout
                assert "simulated error" in listing
                shown = json.loads(cli("dead-letters", "--data-dir", str(data), "show", "1").stdout)
                assert shown["status"] == "error"
                assert shown["command"]["event_type"] == "First"
                assert shown["command"]["ids"] == {"registered": "u1"}

                # Replay while running: the relay picks it up itself.
                replay = cli("dead-letters", "--data-dir", str(data), "replay", "1")
                assert "replaying 1" in replay.stdout
                await eventually(lambda: "First" in [e["type"] for e in sim.events], within=20)
                assert await trio.to_thread.run_sync(relay.terminate) == 0

                # Replay while stopped: it goes out at the next start.
                replay = cli("dead-letters", "--data-dir", str(data), "replay", "--all")
                assert "replaying 1" in replay.stdout
                relay2 = RelayProcess(data, sim_url)
                try:
                    await trio.to_thread.run_sync(relay2.start)
                    await eventually(lambda: "Second" in [e["type"] for e in sim.events],
                                     within=20)
                finally:
                    relay2.kill()
                assert "no dead letters" in cli("dead-letters", "--data-dir", str(data),
                                                "list").stdout
                purge = cli("dead-letters", "--data-dir", str(data), "purge", "--all")
                assert purge.returncode == 0
            finally:
                relay.kill()
            nursery.cancel_scope.cancel()
