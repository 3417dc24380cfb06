"""Admission: a bounded number of messages between intake and their round's commit."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from router.admission import Admission


class TestAdmission:
    """Room is reserved up front, waited for briefly, and given back exactly."""

    async def test_waits_for_room_then_gives_up(self, autojump_clock: trio.testing.MockClock
                                                ) -> None:
        admission = Admission(10)
        assert await admission.acquire(8, 1.0)
        start = trio.current_time()
        assert not await admission.acquire(5, 1.0)
        assert trio.current_time() - start == pytest.approx(1.0)

    async def test_release_wakes_a_waiter(self) -> None:
        admission = Admission(10)
        assert await admission.acquire(10, 1.0)
        got: list[bool] = []
        async with trio.open_nursery() as nursery:
            async def wait() -> None:
                got.append(await admission.acquire(4, 5.0))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            admission.release(6)
        assert got == [True] and admission.used == 8

    async def test_a_request_bigger_than_the_capacity_passes_alone(self) -> None:
        admission = Admission(10)
        assert await admission.acquire(25, 0.1)
        assert admission.used == 25
        assert not await admission.acquire(1, 0.01)
        admission.release(25)
        assert await admission.acquire(1, 0.01)

    def test_releasing_more_than_taken_is_a_bug(self) -> None:
        with pytest.raises(AssertionError):
            Admission(10).release(1)
