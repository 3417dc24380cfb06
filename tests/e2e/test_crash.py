"""kill -9 under load: every message acknowledged with 200 still reaches Infinario."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from segment.analytics.request import post

from router.failpoints import POINTS
from router.simulator import Simulator, run_simulator

from .harness import eventually
from .processes import RelayProcess

BATCH = 25


def load(url: str, acked: list[int], stop: threading.Event, limit: int) -> None:
    """Send batches with the Segment client's own request function until the relay dies."""
    n = 0
    while not stop.is_set() and n < limit:
        batch = [{"type": "track", "userId": f"user-{(n + i) % 40}", "event": "Crash Test",
                  "properties": {"n": n + i}, "messageId": f"m-{n + i}"} for i in range(BATCH)]
        try:
            post("crash-key", url, gzip=bool(n % 2), timeout=5, batch=batch)
        except Exception:
            return
        acked.extend(range(n, n + BATCH))
        n += BATCH


def delivered(sim: Simulator) -> list[int]:
    return [e["properties"]["n"] for e in sim.events if e["type"] == "Crash Test"]


async def restart_and_check(tmp_path: Path, sim: Simulator, sim_url: str,
                            acked: list[int], label: str) -> None:
    """Start the relay again on the same data dir: every acked message arrives, and only
    commands that were in flight at the crash may arrive twice."""
    restarted = RelayProcess(tmp_path / "data", sim_url)
    await trio.to_thread.run_sync(restarted.start)
    try:
        wanted = set(acked)
        await eventually(lambda: wanted <= set(delivered(sim)), within=60, interval=0.2)
    finally:
        assert await trio.to_thread.run_sync(restarted.terminate) == 0
    got = delivered(sim)
    duplicates = len(got) - len(set(got))
    report: dict[str, Any] = {"acked": len(acked), "delivered": len(set(got)),
                              "duplicates": duplicates}
    print(f"crash {label}: {report}")
    assert set(acked) <= set(got)
    # Duplicates only for commands in flight at the kill: at most the lanes' requests.
    assert duplicates <= 8 * 50


async def crash_run(tmp_path: Path, *, seed: int = 0, point: str | None = None) -> None:
    rng = random.Random(seed)
    sim = Simulator()
    async with trio.open_nursery() as nursery:
        sim_url: str = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
        env = {"ROUTER_CRASH_AT": f"{point}:{rng.randint(5, 30)}"} if point else {}
        relay = RelayProcess(tmp_path / "data", sim_url, env=env)
        acked: list[int] = []
        stop = threading.Event()
        try:
            url = await trio.to_thread.run_sync(relay.start)
            loader = threading.Thread(target=load, args=(url, acked, stop, 20_000))
            loader.start()
            if point:
                # The relay kills itself inside that store transaction.
                code = await trio.to_thread.run_sync(relay.wait_exit, 60)
                assert code == -9, f"the relay did not die at {point} (exit {code})"
            else:
                await trio.sleep(0.3 + rng.random() * 1.2)
                relay.kill()
            stop.set()
            await trio.to_thread.run_sync(loader.join, 30)
            assert acked, "the relay acknowledged nothing before the kill"
            await restart_and_check(tmp_path, sim, sim_url, acked, point or f"seed {seed}")
        finally:
            relay.kill()
            stop.set()
        nursery.cancel_scope.cancel()


class TestCrash:
    """A relay killed with SIGKILL mid-load loses nothing it acknowledged."""

    @pytest.mark.parametrize("seed", [1, 2, 3])
    async def test_kill_9_then_restart_delivers_every_acked_message(
        self, tmp_path: Path, seed: int
    ) -> None:
        await crash_run(tmp_path, seed=seed)

    @pytest.mark.slow
    @pytest.mark.parametrize("seed", range(4, 24))
    async def test_kill_9_at_random_moments(self, tmp_path: Path, seed: int) -> None:
        await crash_run(tmp_path, seed=seed)


class TestCrashPoints:
    """Killed inside a journal append, a round's commit or the record of Infinario's
    answers, the relay restarts without losing an acked message."""

    @pytest.mark.parametrize("point", POINTS)
    async def test_kill_inside_the_transaction(self, tmp_path: Path, point: str) -> None:
        await crash_run(tmp_path, seed=len(point), point=point)
