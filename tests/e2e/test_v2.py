"""Bloomreach Engagement tracking API v2: credentials and the rate limit."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from router.simulator import Simulator

from .harness import PROJECT, WRITE_KEY, eventually, open_stack


async def track(url: str, event: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/v1/track", auth=(WRITE_KEY, ""),
                                     json={"userId": "u1", "event": event})
        assert response.status_code == 200


class TestCredentials:
    """Bad v2 credentials are a configuration error: reported, data kept for after the fix."""

    async def test_could_not_authenticate_keeps_data_until_fixed(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        sim = Simulator(v2_auth={PROJECT: "Token right"})
        data = tmp_path / "data"
        async with open_stack(data, api="v2", sim=sim, infinario_auth="token:wrong") as stack:
            await track(stack.url, "Kept")
            await eventually(
                lambda: stack.router.metrics.get("infinario_requests_total", outcome="auth") >= 2,
                within=20)
            assert sim.events == []
            assert stack.router.metrics.get("dead_letters_total") == 0
        out = capsys.readouterr().out
        assert out.count("Infinario refused the credentials") == 1

        async with open_stack(data, api="v2", sim=sim, infinario_auth="token:right") as stack:
            await stack.settle()
            assert [e["type"] for e in sim.events] == ["Kept"]

    async def test_per_project_credentials(self, tmp_path: Path) -> None:
        sim = Simulator(v2_auth={PROJECT: "Basic aWQ6c2VjcmV0"})
        async with open_stack(tmp_path / "data", api="v2", sim=sim,
                              project_auth={PROJECT: "basic:id:secret"}) as stack:
            await track(stack.url, "Basic")
            await stack.settle()
            assert [e["type"] for e in sim.events] == ["Basic"]


class TestRateLimit:
    """The sender stays under Infinario's rate limit with a token bucket instead of 429s."""

    async def test_no_429_under_the_configured_limit(self, tmp_path: Path) -> None:
        # 120 requests per minute: two a second, with a burst of two.
        sim = Simulator(rate_limit_per_minute=120)
        async with open_stack(tmp_path / "data", api="v2", sim=sim, rate_limit=120,
                              infinario_auth="token:t", concurrency=4) as stack:
            start = trio.current_time()
            async with httpx.AsyncClient() as client:
                for i in range(6):
                    # Different customers land in different lanes: parallel requests.
                    response = await client.post(
                        f"{stack.url}/v1/track", auth=(WRITE_KEY, ""),
                        json={"userId": f"user-{i}", "event": f"E{i}"})
                    assert response.status_code == 200
            await stack.settle()
            elapsed = trio.current_time() - start
        assert sorted(e["type"] for e in sim.events) == [f"E{i}" for i in range(6)]
        assert sim.statuses.get(429, 0) == 0
        requests = sim.counts["requests"]
        assert requests >= 3
        # A burst of two, then two a second.
        assert elapsed >= (requests - 2) / 2 - 0.05
