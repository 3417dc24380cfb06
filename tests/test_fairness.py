"""Per-key fairness: a flood on one write key does not starve the others."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from router import app, open_router
from router.admission import Admission

from .conftest import FakeInfinario, relay_config


class TestAdmissionShare:
    """While another key waits, a key holding half of the capacity gets no more."""

    async def test_waiting_key_gets_room_before_the_flooding_key(self) -> None:
        admission = Admission(1000)
        assert await admission.acquire(500, 0, "a")
        assert await admission.acquire(500, 0, "a")
        got: list[bool] = []

        async def other() -> None:
            got.append(await admission.acquire(1, 1.0, "b"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
            # The flood gives room back and asks again at once, without yielding:
            # it must not take the room the waiting key needs.
            admission.release(500)
            assert not await admission.acquire(500, 0, "a")
            await trio.testing.wait_all_tasks_blocked()
        assert got == [True]
        # Once nobody waits, the flood may take what is left.
        assert await admission.acquire(499, 0, "a")
        assert admission.held == {"a": 999, "b": 1}

    async def test_a_lone_key_may_use_all_of_it(self) -> None:
        admission = Admission(1000)
        assert await admission.acquire(600, 0, "a")
        assert await admission.acquire(400, 0, "a")
        admission.release(1000)
        assert admission.used == 0 and admission.held == {}


class TestFlood:
    """One client floods key A with large batches; key B's single messages still pass."""

    async def test_single_messages_pass_during_a_batch_flood(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(app, "ADMISSION_CAPACITY", 2000)
        infinario = FakeInfinario()
        config = relay_config(tmp_path / "data", write_keys={"a": "pa", "b": "pb"})
        async with open_router(
            config, http=True, transport=httpx.MockTransport(infinario.handler)
        ) as router:
            stop = trio.Event()
            flood_answers: list[int] = []
            latencies: list[float] = []

            async def flood(worker: int) -> None:
                async with httpx.AsyncClient(base_url=router.url or "", timeout=30) as client:
                    n = 0
                    while not stop.is_set():
                        batch = [{"type": "track", "userId": f"a{i % 50}", "event": "Flood",
                                  "messageId": f"a-{worker}-{n}-{i}"} for i in range(500)]
                        n += 1
                        response = await client.post("/v1/batch", auth=("a", ""),
                                                      json={"batch": batch})
                        flood_answers.append(response.status_code)

            async def trickle() -> None:
                async with httpx.AsyncClient(base_url=router.url or "", timeout=30) as client:
                    for n in range(30):
                        started = trio.current_time()
                        response = await client.post("/v1/track", auth=("b", ""), json={
                            "type": "track", "userId": "b", "event": "Trickle",
                            "messageId": f"b-{n}", "properties": {"n": n}})
                        assert response.status_code == 200, response.text
                        latencies.append(trio.current_time() - started)
                        await trio.sleep(0.02)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for worker in range(8):
                        nursery.start_soon(flood, worker)
                    await trio.sleep(0.3)
                    await trickle()
                    stop.set()
                await router.drain()
        assert len(latencies) == 30 and max(latencies) < 2.0
        assert 200 in flood_answers
        trickled = [c for c in infinario.commands
                    if c["name"] == "crm/events" and c["data"]["type"] == "Trickle"]
        assert sorted(c["data"]["properties"]["n"] for c in trickled) == list(range(30))
