"""The real CLI: serve, SIGTERM, startup errors, dead-letter management."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from router.simulator import Simulator, run_simulator

from ..conftest import run_cli
from .harness import eventually
from .processes import RelayProcess

cli = run_cli


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal: the last stderr line, after any JSON log lines, which must all parse."""
    *logs, last = result.stderr.strip().splitlines()
    for line in logs:
        json.loads(line)
    assert last.startswith("infinario-router: "), result.stderr
    return last


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

    async def test_draining_answers_503_then_a_second_signal_exits_at_once(
        self, tmp_path: Path
    ) -> None:
        sim = Simulator()
        sim.fail_requests(503)  # Infinario down: the drain cannot finish by itself
        async with trio.open_nursery() as nursery:
            sim_url = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            relay = RelayProcess(tmp_path / "data", sim_url, "--grace", "30")
            try:
                url = await trio.to_thread.run_sync(relay.start)
                assert (await track(url, "Kept On Disk")).status_code == 200
                assert relay.proc is not None
                relay.proc.send_signal(signal.SIGTERM)
                async with httpx.AsyncClient() as client:
                    async def draining() -> bool:
                        answer = await client.get(f"{url}/health")
                        return answer.status_code == 503

                    await eventually(draining, within=10)
                    # Still accepting connections, answering 503 with Retry-After.
                    response = await track(url, "During Drain")
                    assert response.status_code == 503
                    assert int(response.headers["retry-after"]) > 0
                started = trio.current_time()
                relay.proc.send_signal(signal.SIGTERM)
                assert await trio.to_thread.run_sync(relay.wait_exit, 10) == 0
                assert trio.current_time() - started < 5
            finally:
                relay.kill()
            # What was acked waits on disk: the next start delivers it.
            sim.clear_faults()
            again = RelayProcess(tmp_path / "data", sim_url)
            try:
                await trio.to_thread.run_sync(again.start)
                await eventually(lambda: "Kept On Disk" in [e["type"] for e in sim.events],
                                 within=20)
                assert await trio.to_thread.run_sync(again.terminate) == 0
            finally:
                again.kill()
            assert [e["type"] for e in sim.events] == ["Kept On Disk"]
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


class TestStartupErrors:
    """Every startup failure is one line naming the setting or resource, exit 2, simulated too."""

    SIMULATE = ("--simulate", "--simulator-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0")
    REAL = ("--write-key", "a=b", "--listen", "127.0.0.1:0")

    def test_unwritable_data_dir(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        for mode in (self.SIMULATE, self.REAL):
            result = cli("serve", "--data-dir", str(blocker / "sub"), *mode)
            assert result.returncode == 2
            line = error_line(result)
            assert "data dir" in line and "Traceback" not in result.stderr

    def test_corrupt_database(self, tmp_path: Path) -> None:
        data = tmp_path / "data"
        data.mkdir()
        (data / "router.db").write_bytes(b"this is not a database" * 100)
        for mode in (self.SIMULATE, self.REAL):
            result = cli("serve", "--data-dir", str(data), *mode)
            assert result.returncode == 2
            assert "move it aside" in error_line(result)

    async def test_locked_data_dir(self, tmp_path: Path) -> None:
        relay = RelayProcess(tmp_path / "data", "http://127.0.0.1:9")
        try:
            await trio.to_thread.run_sync(relay.start)
            result = await trio.to_thread.run_sync(
                lambda: cli("serve", "--data-dir", str(tmp_path / "data"), *self.SIMULATE))
            assert result.returncode == 2
            assert "in use by another infinario-router" in error_line(result)
        finally:
            relay.kill()

    def test_address_in_use(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = cli("serve", "--data-dir", str(tmp_path / "a"), "--write-key", "a=b",
                         "--listen", f"127.0.0.1:{port}")
            assert result.returncode == 2
            assert error_line(result) == (
                f"infinario-router: listen: 127.0.0.1:{port} is already in use; stop the other "
                "process or choose another --listen")
            result = cli("serve", "--data-dir", str(tmp_path / "b"), "--simulate",
                         "--listen", "127.0.0.1:0", "--simulator-listen", f"127.0.0.1:{port}")
            assert result.returncode == 2
            assert error_line(result) == (
                f"infinario-router: simulator-listen: 127.0.0.1:{port} is already in use; stop "
                "the other process or choose another --simulator-listen")

    def test_bad_simulator_listen_from_the_environment(self, tmp_path: Path) -> None:
        result = cli("serve", "--simulate", "--data-dir", str(tmp_path),
                     env={"ROUTER_SIMULATOR_LISTEN": "nowhere"})
        assert (result.returncode, result.stderr.splitlines()) == (
            2, ["infinario-router: simulator-listen: expected HOST:PORT, got 'nowhere'"])


class TestSimulateBanner:
    """Under --simulate the simulator's address is a structured log line like every other."""

    def test_banner_is_json_and_environment_sets_the_address(self, tmp_path: Path) -> None:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--simulate", "--listen", "127.0.0.1:0",
             "--data-dir", str(tmp_path)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env=dict(os.environ, ROUTER_SIMULATOR_LISTEN=f"127.0.0.1:{port}",
                     PYTHONUNBUFFERED="1"))
        try:
            assert proc.stderr is not None
            lines = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                assert line, "relay exited: " + "".join(lines)
                lines.append(line)
                if '"router started"' in line:
                    break
            records = [json.loads(line) for line in lines]
            banner = next(r for r in records if r["event"] == "simulator listening")
            assert banner["url"] == f"http://127.0.0.1:{port}"
            assert banner["level"] == "info"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0


class TestSimulatorCommand:
    """``simulator`` takes the simulator's own options."""

    def test_help_shows_the_simulator_options(self) -> None:
        result = cli("simulator", "--help")
        assert result.returncode == 0
        assert "usage: infinario-router simulator" in result.stdout
        for option in ("--listen", "--counting", "--delay", "--rate-limit"):
            assert option in result.stdout

    def test_listen_is_accepted(self) -> None:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "simulator", "--listen", f"127.0.0.1:{port}"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert line.startswith(f"simulator: listening on http://127.0.0.1:{port}"), line
            assert httpx.get(f"http://127.0.0.1:{port}/_sim/events").status_code == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0

    def test_bad_option_is_one_line(self) -> None:
        result = cli("simulator", "--listen", "nowhere")
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1


class TestVersion:
    """``--version`` names the program and its version."""

    def test_version(self) -> None:
        result = cli("--version")
        assert (result.returncode, result.stdout) == (0, "infinario-router 0.1.0\n")


class TestDeadLetterDataDir:
    """``dead-letters`` finds the data dir like ``serve`` does, with its flags anywhere."""

    @staticmethod
    def make_db(data: Path) -> None:
        from router import store as st

        data.mkdir(parents=True)
        st.open_database(data / st.DB_NAME).close()

    def test_flags_before_or_after_the_action(self, tmp_path: Path) -> None:
        data = tmp_path / "var"
        self.make_db(data)
        for args in (("--data-dir", str(data), "list"), ("list", "--data-dir", str(data)),
                     ("purge", "--all", "--data-dir", str(data))):
            result = cli("dead-letters", *args, cwd=tmp_path / "..")
            assert result.returncode == 0, result.stderr
        assert cli("dead-letters", "list", "--data-dir", str(data)).stdout == "no dead letters\n"

    def test_environment_and_config(self, tmp_path: Path) -> None:
        data = tmp_path / "from-env"
        self.make_db(data)
        result = cli("dead-letters", "list", env={"ROUTER_DATA_DIR": str(data)})
        assert (result.returncode, result.stdout) == (0, "no dead letters\n")

        other = tmp_path / "from-toml"
        self.make_db(other)
        toml = tmp_path / "r.toml"
        toml.write_text(f"data_dir = {str(other)!r}\n")
        result = cli("dead-letters", "list", env={"ROUTER_CONFIG": str(toml)})
        assert (result.returncode, result.stdout) == (0, "no dead letters\n")
        result = cli("dead-letters", "list", "--config", str(toml))
        assert (result.returncode, result.stdout) == (0, "no dead letters\n")
        # The environment beats the file, a flag beats both.
        missing = tmp_path / "missing"
        result = cli("dead-letters", "list", "--config", str(toml),
                     env={"ROUTER_DATA_DIR": str(missing)})
        assert result.returncode == 2 and str(missing) in result.stderr
        result = cli("dead-letters", "list", "--data-dir", str(data),
                     env={"ROUTER_DATA_DIR": str(missing)})
        assert result.returncode == 0

    def test_missing_database_is_one_line(self, tmp_path: Path) -> None:
        result = cli("dead-letters", "list", "--data-dir", str(tmp_path / "nothing"))
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1
