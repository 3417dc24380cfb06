"""Infinario down for a long stretch: the backlog waits on disk, then everything arrives."""

from __future__ import annotations

import httpx
import pytest
import trio

from router.infinario import MAX_COMMANDS
from router.sender import LANE_CHANNEL_ROWS

from .harness import PROJECT, WRITE_KEY, Stack, eventually

LANES = 2
WINDOW = 20
# A lane holds its window, the row that crossed it and the rows in its channel.
IN_MEMORY = LANES * (WINDOW + (1 + LANE_CHANNEL_ROWS) * MAX_COMMANDS)


@pytest.mark.parametrize("stack_options", [{"concurrency": LANES, "lane_window": WINDOW}])
class TestOutage:
    """A long outage costs disk, not memory, and loses nothing."""

    async def test_backlog_on_disk_then_full_delivery(self, stack: Stack) -> None:
        stack.sim.fail_requests(503)
        total = 0
        async with httpx.AsyncClient() as client:
            for round_ in range(20):
                batch = [{"type": "track", "userId": f"user-{i % 50}", "event": "Outage",
                          "properties": {"n": round_ * 100 + i}} for i in range(100)]
                response = await client.post(f"{stack.url}/v1/batch", auth=(WRITE_KEY, ""),
                                             json={"batch": batch})
                assert response.status_code == 200
                total += len(batch)
                # Memory holds at most a window per lane, whatever the backlog.
                assert stack.router.sender.pending <= IN_MEMORY
        await trio.sleep(0.5)
        assert stack.router.sender.pending <= IN_MEMORY
        assert stack.router.spool.bytes > 0
        assert [e for e in stack.sim.events if e["project"] == PROJECT] == []

        stack.sim.clear_faults()
        await eventually(lambda: len(stack.sim.events) >= total, within=60)
        await stack.settle()
        got = sorted(e["properties"]["n"] for e in stack.sim.events)
        assert got == list(range(total))
        assert stack.router.metrics.get("dead_letters_total") == 0
        assert stack.router.spool.bytes == 0

    async def test_spool_cap_turns_intake_away_with_503(self, stack: Stack) -> None:
        stack.sim.fail_requests(503)
        stack.router.spool.cap = 20_000
        statuses = []
        async with httpx.AsyncClient() as client:
            for round_ in range(10):
                batch = [{"type": "track", "userId": "u", "event": "Capped",
                          "properties": {"n": round_ * 50 + i}} for i in range(50)]
                response = await client.post(f"{stack.url}/v1/batch", auth=(WRITE_KEY, ""),
                                             json={"batch": batch})
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert response.headers["retry-after"]
        assert 200 in statuses and 503 in statuses
        accepted = 50 * statuses.count(200)
        stack.sim.clear_faults()
        await eventually(lambda: len(stack.sim.events) >= accepted, within=60)
        await stack.settle()
        assert len(stack.sim.events) == accepted
