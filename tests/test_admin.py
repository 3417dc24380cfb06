"""The operator endpoints: on the intake, or on their own --admin-listen listener."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from router import StartupError, open_router
from router.cli import startup_error

from .conftest import PROJECT, WRITE_KEY, FakeInfinario, Relay, relay_config
from .test_config import run_cli
from .test_intake import basic, track

ADMIN_ONLY = ("/metrics", "/report", "/ready")


class TestWithAdminListener:
    """With --admin-listen the operator endpoints move there; /health stays on both."""

    @pytest.fixture
    def relay_options(self) -> dict[str, Any]:
        return {"admin_listen": "127.0.0.1:0"}

    async def test_admin_serves_everything(self, relay: Relay) -> None:
        await relay.client.post("/v1/track", json=track(1), headers=basic(WRITE_KEY))
        await relay.delivered()
        assert relay.router.admin_url is not None
        assert relay.router.admin_url != relay.url
        async with httpx.AsyncClient(base_url=relay.router.admin_url, timeout=10) as admin:
            metrics = await admin.get("/metrics")
            assert metrics.status_code == 200
            assert "router_messages_accepted_total 1.0" in metrics.text
            report = await admin.get("/report")
            assert report.status_code == 200
            assert PROJECT in report.json()["projects"]
            ready = await admin.get("/ready")
            assert (ready.status_code, ready.json()) == (200, {"ready": True})
            health = await admin.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert (await admin.get("/nowhere")).status_code == 404
            assert (await admin.post("/v1/track", json=track(2))).status_code == 404
            assert (await admin.post("/metrics")).status_code == 405

    async def test_intake_keeps_only_health(self, relay: Relay) -> None:
        for path in ADMIN_ONLY:
            response = await relay.client.get(path)
            assert response.status_code == 404, path
            assert response.json()["code"] == "not_found"
        health = await relay.client.get("/health")
        assert health.status_code == 200


class TestWithoutAdminListener:
    """Without --admin-listen the intake serves /metrics, /health and /ready; never /report."""

    async def test_intake_serves_probes_not_the_report(self, relay: Relay) -> None:
        assert relay.router.admin_url is None
        assert (await relay.client.get("/metrics")).status_code == 200
        assert (await relay.client.get("/health")).status_code == 200
        ready = await relay.client.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        report = await relay.client.get("/report")
        assert report.status_code == 404
        assert PROJECT not in report.text


class TestReady:
    """/ready is 503 with the reason while draining, saturated or unable to write."""

    async def ready(self, relay: Relay) -> tuple[int, dict[str, Any]]:
        response = await relay.client.get("/ready")
        return response.status_code, response.json()

    async def test_draining(self, relay: Relay) -> None:
        relay.router.stop()
        status, body = await self.ready(relay)
        assert status == 503
        assert body == {"ready": False, "reason": "the relay is draining"}

    async def test_admission_full(self, relay: Relay) -> None:
        admission = relay.router.admission
        assert await admission.acquire(admission.capacity, 0)
        try:
            status, body = await self.ready(relay)
            assert (status, body["reason"]) == (503, "pipeline is full")
        finally:
            admission.release(admission.capacity)
        assert await self.ready(relay) == (200, {"ready": True})

    async def test_cannot_write(self, relay: Relay) -> None:
        store = relay.router.store

        def freeze_size(conn: Any) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")

        await store.call(freeze_size)
        batch = {"batch": [track(n, properties={"pad": "x" * 20_000}) for n in range(20)]}
        response = await relay.client.post("/v1/batch", json=batch, headers=basic(WRITE_KEY))
        assert response.status_code == 503  # clients retry it
        assert int(response.headers["retry-after"]) > 0
        status, body = await self.ready(relay)
        assert status == 503
        assert body["reason"].startswith("cannot write to the data dir: ")
        assert "full" in body["reason"]
        await store.call(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
        response = await relay.client.post("/v1/track", json=track(99), headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert await self.ready(relay) == (200, {"ready": True})


class TestSpoolOverCap:
    """A spool over its cap makes the relay not ready."""

    @pytest.fixture
    def relay_options(self) -> dict[str, Any]:
        return {"spool_cap": 1}

    async def test_spool_full(self, relay: Relay) -> None:
        relay.router.spool.add(1)
        response = await relay.client.get("/ready")
        assert response.status_code == 503
        assert response.json()["reason"] == "spool is over its disk cap"


class TestAdminPortBusy:
    """A busy admin port stops the relay at start with one line naming admin-listen."""

    async def test_open_router(self, tmp_path: Path) -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            config = relay_config(tmp_path, admin_listen=f"127.0.0.1:{port}")
            transport = httpx.MockTransport(FakeInfinario().handler)
            with pytest.raises((StartupError, BaseExceptionGroup)) as failed:
                async with open_router(config, http=True, transport=transport):
                    raise AssertionError("started on a busy port")
        # However trio nests it, it is the one line the CLI prints.
        error = startup_error(failed.value, config)
        assert isinstance(error, StartupError)
        assert str(error).startswith(f"admin-listen: 127.0.0.1:{port} is already in use")
        assert "--admin-listen" in str(error)

    async def test_cli_exit_2(self, tmp_path: Path) -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = await trio.to_thread.run_sync(lambda: run_cli(
                "serve", "--listen", "127.0.0.1:0", "--admin-listen", f"127.0.0.1:{port}",
                "--write-key", "k=p", "--data-dir", str(tmp_path / "data"),
                "--infinario-url", "http://127.0.0.1:9"))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"infinario-router: admin-listen: 127.0.0.1:{port} is "
                                    "already in use"), result.stderr
        assert "Traceback" not in result.stderr

    def test_bad_setting(self, tmp_path: Path) -> None:
        result = run_cli("serve", "--admin-listen", "nowhere", "--write-key", "k=p",
                         "--data-dir", str(tmp_path))
        assert result.returncode == 2
        assert result.stderr.strip() == ("infinario-router: admin-listen: expected HOST:PORT, "
                                         "got 'nowhere'")
