"""The sender against a failing Infinario: retries, dead letters, Retry-After."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from .harness import PROJECT, Stack, eventually


def typed(stack: Stack, prefix: str) -> list[str]:
    return [e["type"] for e in stack.sim.events
            if e["project"] == PROJECT and e["type"].startswith(prefix)]


async def dead_letters(stack: Stack) -> list[tuple[Any, ...]]:
    return await stack.router.store.call(
        lambda conn: conn.execute(
            "SELECT status, errors, command IS NOT NULL FROM dead_letters ORDER BY id"
        ).fetchall()
    )


async def send(stack: Stack, count: int, prefix: str = "E") -> None:
    client = stack.client()
    for i in range(count):
        await stack.run(client.track, f"user-{i % 3}", f"{prefix}{i}")
    assert client.errors == []


class TestFaults:
    """Failures at Infinario never lose or duplicate what the relay acknowledged."""

    async def test_http_500_then_recovery_delivers_everything_once(self, stack: Stack) -> None:
        stack.sim.fail_requests(500, count=3)
        await send(stack, 6)
        await stack.settle()
        assert sorted(typed(stack, "E")) == sorted(f"E{i}" for i in range(6))
        assert await dead_letters(stack) == []
        assert stack.router.metrics.get("infinario_requests_total", outcome="retry") >= 3

    # v2 has no per-command retry status: a legacy-only behaviour.
    @pytest.mark.parametrize("api", ["legacy"])
    async def test_per_command_retry_is_resent(self, stack: Stack) -> None:
        stack.sim.fail_commands("retry", count=2)
        await send(stack, 4)
        await stack.settle()
        assert sorted(typed(stack, "E")) == ["E0", "E1", "E2", "E3"]
        assert stack.router.metrics.get("commands_retried_total") == 2

    async def test_per_command_error_is_dead_lettered_not_resent(self, stack: Stack) -> None:
        stack.sim.fail_commands("error", count=1)
        await send(stack, 3)
        await stack.settle()
        delivered = typed(stack, "E")
        assert len(delivered) == 2
        dead = await dead_letters(stack)
        assert len(dead) == 1 and dead[0][0] == "error" and dead[0][2] == 1
        # Nothing more is sent for it later.
        await trio.sleep(0.5)
        assert len(typed(stack, "E")) == 2

    async def test_missing_tail_results_are_retried(self, stack: Stack) -> None:
        stack.sim.truncate_results(1)
        await send(stack, 1)
        await stack.settle()
        assert typed(stack, "E") == ["E0"]
        assert await dead_letters(stack) == []

    async def test_429_retry_after_is_honoured(self, stack: Stack) -> None:
        stack.sim.fail_requests(429, count=1, retry_after=1.5)
        start = trio.current_time()
        await send(stack, 1)
        await stack.settle()
        assert typed(stack, "E") == ["E0"]
        assert trio.current_time() - start >= 1.5

    @pytest.mark.parametrize("stack_options", [{"retry_window": 0.5}])
    async def test_retry_window_dead_letters_after_it_runs_out(self, stack: Stack) -> None:
        stack.sim.fail_requests(503)
        await send(stack, 1)
        await eventually(lambda: dead_letters(stack), within=20)
        dead = await dead_letters(stack)
        assert dead[0][0] == "expired"
        stack.sim.clear_faults()
