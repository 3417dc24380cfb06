"""kill -9 under load: every message acknowledged with 200 still reaches Infinario."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from segment.analytics.request import post

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


class TestCrash:
    """A relay killed with SIGKILL mid-load loses nothing it acknowledged."""

    @pytest.mark.parametrize("seed", [1, 2, 3])
    async def test_kill_9_then_restart_delivers_every_acked_message(
        self, tmp_path: Path, seed: int
    ) -> None:
        rng = random.Random(seed)
        sim = Simulator()
        async with trio.open_nursery() as nursery:
            sim_url: str = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            relay = RelayProcess(tmp_path / "data", sim_url)
            acked: list[int] = []
            stop = threading.Event()
            try:
                url = await trio.to_thread.run_sync(relay.start)
                loader = threading.Thread(target=load, args=(url, acked, stop, 20_000))
                loader.start()
                await trio.sleep(0.3 + rng.random() * 1.2)
                relay.kill()
                stop.set()
                await trio.to_thread.run_sync(loader.join, 30)
                assert acked, "the relay acknowledged nothing before the kill"

                restarted = RelayProcess(tmp_path / "data", sim_url)
                await trio.to_thread.run_sync(restarted.start)
                try:
                    wanted = set(acked)
                    await eventually(lambda: wanted <= set(delivered(sim)), within=60,
                                     interval=0.2)
                finally:
                    assert await trio.to_thread.run_sync(restarted.terminate) == 0
            finally:
                relay.kill()
                stop.set()
            got = delivered(sim)
            duplicates = len(got) - len(set(got))
            report: dict[str, Any] = {"acked": len(acked), "delivered": len(set(got)),
                                      "duplicates": duplicates}
            print(f"crash seed {seed}: {report}")
            assert set(acked) <= set(got)
            # Duplicates only for commands in flight at the kill: at most the lanes' requests.
            assert duplicates <= 8 * 50
            nursery.cancel_scope.cancel()
