"""The customer directory through the real pipeline: identity, merges, groups, session timers,
hibernation and restarts, observed at a recording fake Infinario and in the store."""

from __future__ import annotations

import json
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from msgspec.structs import replace
from trio.testing import MockClock

from router import Config, Router, identity, open_router
from router.customer import CustomerState, state_decoder

from .conftest import FakeInfinario

WK = "wk"
PROJECT = "proj"


@asynccontextmanager
async def running(
    data_dir: Path, infinario: FakeInfinario, **options: Any
) -> AsyncIterator[Router]:
    # No linger: tests that stop virtual time must not wait on a sender timer.
    options.setdefault("linger", 0.0)
    config = Config(write_keys={WK: PROJECT}, data_dir=data_dir,
                    infinario_url="http://infinario.test", **options)
    async with open_router(config, transport=httpx.MockTransport(infinario.handler)) as router:
        yield router


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def start_time(router: Router) -> float:
    """Whole seconds near the router's wall clock, so ISO timestamps round-trip exactly."""
    return float(math.floor(router.wall()))


async def send(router: Router, kind: str, at: float, **fields: Any) -> None:
    await router.submit({"type": kind, "timestamp": iso(at), **fields}, write_key=WK)


def events(infinario: FakeInfinario, event_type: str | None = None) -> list[dict[str, Any]]:
    return [c["data"] for c in infinario.commands
            if c["name"] == "crm/events"
            and (event_type is None or c["data"]["type"] == event_type)]


def customers(infinario: FakeInfinario) -> list[dict[str, Any]]:
    return [c["data"] for c in infinario.commands if c["name"] == "crm/customers"]


def key_of(router: Router, id_key: str) -> int:
    return router.partition.index[(PROJECT, id_key)]


def state_of(router: Router, id_key: str) -> CustomerState:
    return router.partition.states[key_of(router, id_key)]


async def query(router: Router, sql: str) -> list[tuple[Any, ...]]:
    return await router.store.call(lambda conn: conn.execute(sql).fetchall())


async def stored_ids(router: Router) -> dict[str, int]:
    return dict(await query(router, f"SELECT id, customer FROM ids WHERE project = '{PROJECT}'"))


def freeze(clock: MockClock) -> None:
    """Stop virtual time: the store works in a thread, and with autojump on, every wait
    for it lets the clock jump to the next deadline (ending sessions too early)."""
    clock.autojump_threshold = math.inf


def thaw(clock: MockClock) -> None:
    clock.autojump_threshold = 0


async def settle(router: Router, clock: MockClock) -> None:
    """Once a sleep made timers due, freeze the clock and wait for what they started: their
    round may still be committing in the store thread when the sleep returns."""
    freeze(clock)
    await router.store.call(lambda conn: None)  # after every store operation queued so far
    await trio.testing.wait_all_tasks_blocked()  # the directory handed its rows on
    await router.drain()


class TestMergeByAlias:
    """alias merges an anonymous customer into the registered one: one customer remains, the
    index maps both ids to it, the store agrees, and their sessions become one."""

    async def test_alias_merges(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario) as router:
            t0 = start_time(router)
            await send(router, "page", t0, anonymousId="a1")
            await send(router, "page", t0 + 10, userId="u1")
            await router.drain()
            anonymous, registered = key_of(router, "c:a1"), key_of(router, "r:u1")
            assert anonymous != registered

            await send(router, "alias", t0 + 20, userId="u1", previousId="a1")
            await send(router, "page", t0 + 30, anonymousId="a1")
            await router.drain()

            directory = router.partition
            assert list(directory.states) == [registered]
            assert key_of(router, "c:a1") == key_of(router, "r:u1") == registered
            state = directory.states[registered]
            assert (state.registered, state.cookies) == ("u1", ["a1"])
            # One session: the earlier start, the latest activity.
            assert (state.session_start, state.session_last) == (t0, t0 + 30)
            assert customers(infinario) == [{
                "ids": {"registered": "u1", "cookie": "a1"}, "project_id": PROJECT,
                "properties": {},
            }]
            # The page after the merge continued the combined session.
            assert [e["timestamp"] for e in events(infinario, "session_start")] == [t0, t0 + 10]
            assert len(events(infinario, "page_visit")) == 3

            assert await stored_ids(router) == {"c:a1": registered, "r:u1": registered}
            assert await query(router, "SELECT key FROM customers") == [(registered,)]


class TestMergeByCall:
    """A call carrying the userId of one customer and the anonymousId of another, anonymous,
    customer merges them, keeping the earlier session start and the later last activity."""

    async def test_call_with_both_ids_merges(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario) as router:
            t0 = start_time(router)
            await send(router, "page", t0, userId="u1")
            await send(router, "screen", t0 + 40, anonymousId="a1")
            await send(router, "track", t0 + 41, anonymousId="a2", event="Viewed")
            await router.drain()
            registered = key_of(router, "r:u1")
            assert len({registered, key_of(router, "c:a1"), key_of(router, "c:a2")}) == 3

            await send(router, "identify", t0 + 50, userId="u1", anonymousId="a1",
                       traits={"email": "u1@example.com"})
            await send(router, "track", t0 + 51, userId="u1", anonymousId="a2", event="Bought")
            await router.drain()

            directory = router.partition
            assert list(directory.states) == [registered]
            state = directory.states[registered]
            assert (state.registered, state.cookies) == ("u1", ["a1", "a2"])
            assert (state.session_start, state.session_last) == (t0, t0 + 40)
            assert {key_of(router, i) for i in ("r:u1", "c:a1", "c:a2")} == {registered}
            assert await stored_ids(router) == {"r:u1": registered, "c:a1": registered,
                                                "c:a2": registered}
            assert await query(router, "SELECT key FROM customers") == [(registered,)]
            assert customers(infinario) == [{
                "ids": {"registered": "u1", "cookie": "a1"}, "project_id": PROJECT,
                "properties": {"email": "u1@example.com"},
            }]
            assert events(infinario, "Bought")[0]["customer_ids"] == {
                "registered": "u1", "cookie": "a2"}


class TestRegisteredIdsNeverMerge:
    """An alias whose previousId is another customer's registered id is refused to the dead
    letters with its reason, and both customers stay apart."""

    async def test_alias_of_two_registered_ids_is_refused(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario) as router:
            t0 = start_time(router)
            await send(router, "identify", t0, userId="u1", anonymousId="a1")
            await send(router, "identify", t0 + 1, userId="u2")
            await send(router, "alias", t0 + 2, userId="u1", previousId="u2", messageId="m-a")
            await router.drain()

            first, second = key_of(router, "r:u1"), key_of(router, "r:u2")
            assert first != second
            assert router.partition.states[first].registered == "u1"
            assert router.partition.states[second].registered == "u2"
            assert (PROJECT, "c:u2") not in router.partition.index
            assert len(customers(infinario)) == 2  # the two identifies, no alias

            [(status, project, errors, origin)] = await query(
                router, "SELECT status, project, errors, origin FROM dead_letters")
            assert (status, project) == ("refused", PROJECT)
            [reason] = json.loads(errors)
            assert reason.startswith("alias_registered:") and "'u2'" in reason
            assert json.loads(origin)["messageId"] == "m-a"

    async def test_refused_even_when_the_other_customer_is_hibernated(
        self, tmp_path: Path
    ) -> None:
        infinario = FakeInfinario()
        # One customer in memory: u1 is hibernated (its index entry still cached) when the
        # alias naming it as previousId arrives.
        async with running(tmp_path, infinario, active_customers=1) as router:
            t0 = start_time(router)
            await send(router, "identify", t0, userId="u1")
            await router.drain()
            await send(router, "identify", t0 + 1, userId="u2")
            await router.drain()
            assert key_of(router, "r:u1") not in router.partition.states

            await send(router, "alias", t0 + 2, userId="u2", previousId="u1")
            await router.drain()
            [(status, errors)] = await query(router, "SELECT status, errors FROM dead_letters")
            assert status == "refused" and "alias_registered" in errors

            # The directory is still running.
            await send(router, "track", t0 + 3, userId="u1", event="Still Here")
            await router.drain()
            assert len(events(infinario, "Still Here")) == 1
            assert key_of(router, "r:u1") != key_of(router, "r:u2")


class TestSharedDevice:
    """A cookie last seen with another registered id moves to the new customer; the two
    registered customers are not merged."""

    async def test_cookie_moves_to_a_new_registered_customer(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario) as router:
            t0 = start_time(router)
            await send(router, "identify", t0, userId="u1", anonymousId="device")
            await send(router, "identify", t0 + 1, userId="u2", anonymousId="device")
            await send(router, "page", t0 + 2, anonymousId="device")
            await router.drain()

            first, second = key_of(router, "r:u1"), key_of(router, "r:u2")
            assert first != second
            assert key_of(router, "c:device") == second
            one, two = router.partition.states[first], router.partition.states[second]
            assert (one.registered, one.cookies) == ("u1", [])
            assert (two.registered, two.cookies) == ("u2", ["device"])
            # Anonymous activity on the device now belongs to u2.
            assert one.session_start is None and two.session_start == t0 + 2
            assert await stored_ids(router) == {"r:u1": first, "r:u2": second,
                                                "c:device": second}
            assert len(await query(router, "SELECT key FROM customers")) == 2

    async def test_cookie_moves_to_an_existing_registered_customer(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario) as router:
            t0 = start_time(router)
            await send(router, "identify", t0, userId="u1", anonymousId="device")
            await send(router, "identify", t0 + 1, userId="u2", anonymousId="own")
            await send(router, "track", t0 + 2, userId="u2", anonymousId="device", event="X")
            await router.drain()

            first, second = key_of(router, "r:u1"), key_of(router, "r:u2")
            assert first != second
            assert state_of(router, "r:u1").cookies == []
            assert state_of(router, "r:u2").cookies == ["own", "device"]
            assert key_of(router, "c:device") == second
            assert len(router.partition.states) == 2


class TestGroup:
    """Moving a customer to another group sets the new group and nulls the old group's keys
    the new group lacks."""

    async def test_group_switch_clears_old_keys(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario) as router:
            t0 = start_time(router)
            await send(router, "group", t0, userId="u1", groupId="g1",
                       traits={"name": "Acme", "plan": "pro", "address": {"city": "Oslo"}})
            await send(router, "group", t0 + 1, userId="u1", groupId="g2",
                       traits={"name": "Beta"})
            await router.drain()

            joined, moved = customers(infinario)
            assert joined["properties"] == {"group_id": "g1", "group_name": "Acme",
                                            "group_plan": "pro", "group_address_city": "Oslo"}
            assert moved == {
                "ids": {"registered": "u1"}, "project_id": PROJECT,
                "properties": {"group_id": "g2", "group_name": "Beta", "group_plan": None,
                               "group_address_city": None},
            }
            state = state_of(router, "r:u1")
            assert (state.group_id, state.group_keys) == ("g2", ["group_name"])


class TestSessionTimer:
    """A live session is closed by the timer, with session_end at the last activity's event
    time and the duration between the session's first and last activity."""

    async def test_timer_closes_a_live_session(
        self, tmp_path: Path, autojump_clock: MockClock
    ) -> None:
        infinario = FakeInfinario()
        timeout = 60.0
        freeze(autojump_clock)
        async with running(tmp_path, infinario, session_timeout=timeout) as router:
            t0 = start_time(router)
            await send(router, "page", t0, userId="u1", anonymousId="a1")
            await send(router, "page", t0 + 5, userId="u1", context={"ip": "1.2.3.4"})
            await router.drain()
            assert events(infinario, "session_end") == []
            assert len(router.partition.timers) == 1

            thaw(autojump_clock)
            await trio.sleep(timeout + 10)
            await settle(router, autojump_clock)

            assert [e["type"] for e in events(infinario)] == [
                "session_start", "page_visit", "page_visit", "session_end"]
            [end] = events(infinario, "session_end")
            assert end == {"customer_ids": {"registered": "u1"}, "project_id": PROJECT,
                           "type": "session_end", "properties": {"duration": 5.0},
                           "timestamp": t0 + 5}
            state = state_of(router, "r:u1")
            assert state.session_start is None and state.deadline(timeout) is None
            assert len(router.partition.timers) == 0
            assert await query(router, "SELECT deadline FROM customers") == [(None,)]

            # The next activity starts a new session.
            t1 = start_time(router)
            await send(router, "page", t1, userId="u1")
            await router.drain()
            assert [e["timestamp"] for e in events(infinario, "session_start")] == [t0, t1]

    async def test_session_end_over_the_event_type_limit(
        self, tmp_path: Path, autojump_clock: MockClock
    ) -> None:
        # The project fills its event types before any session has ended: session_end
        # is refused at the timer, which must still close the session and keep running.
        infinario = FakeInfinario()
        timeout = 60.0
        async with running(tmp_path, infinario, session_timeout=timeout,
                           max_event_types=3) as router:
            freeze(autojump_clock)
            t0 = start_time(router)
            await send(router, "page", t0, userId="u1")
            await send(router, "track", t0 + 1, userId="u1", event="Bought")
            await router.drain()
            thaw(autojump_clock)
            await trio.sleep(timeout + 10)
            await settle(router, autojump_clock)

            assert events(infinario, "session_end") == []
            assert len(router.partition.timers) == 0
            await send(router, "track", t0 + 100, userId="u1", event="Bought")
            await router.drain()
            assert len(events(infinario, "Bought")) == 2


class TestHibernation:
    """Idle customers leave memory past the cache size, and come back from the store with
    their open session and group intact."""

    async def test_evicted_customer_is_restored(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario, active_customers=2) as router:
            t0 = start_time(router)
            await send(router, "group", t0, userId="u0", groupId="g1", traits={"plan": "pro"})
            for n in range(10):
                await send(router, "page", t0 + n, userId=f"u{n}", anonymousId=f"a{n}")
                await router.drain()
            directory = router.partition
            assert len(directory.states) <= 2
            assert len(directory.index) <= 4
            assert len(directory.timers) == 10  # hibernated sessions keep their deadline
            assert len(await query(router, "SELECT key FROM customers")) == 10
            first = dict(await query(router, "SELECT id, customer FROM ids"))["r:u0"]
            assert first not in directory.states

            await send(router, "page", t0 + 60, anonymousId="a0")
            await send(router, "group", t0 + 61, userId="u0", groupId="g2")
            await router.drain()

            state = directory.states[first]
            assert (state.registered, state.cookies) == ("u0", ["a0"])
            assert (state.session_start, state.session_last) == (t0, t0 + 60)
            assert state.group_id == "g2"
            starts = [e for e in events(infinario, "session_start")
                      if e["customer_ids"].get("registered") == "u0"]
            assert len(starts) == 1
            assert customers(infinario)[-1]["properties"] == {"group_id": "g2",
                                                              "group_plan": None}
            assert len(events(infinario, "page_visit")) == 11


    # Seed 26 with a cache of 8 reads back a customer this round already changed.
    @pytest.mark.parametrize(("seed", "cache"), [(26, 8), (11, 5), (12, 3), (14, 4)])
    async def test_a_small_cache_decides_as_a_large_one(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, cache: int
    ) -> None:
        """Customers read back in the middle of a round, after the round has merged,
        moved and trimmed ids, end exactly as with every customer in memory."""
        monkeypatch.setattr(identity, "MAX_COOKIES", 2)  # cookie trims (unlinks) happen
        rng = random.Random(seed)
        t0 = 1_700_000_000.0
        calls: list[dict[str, Any]] = []
        for n in range(600):
            # Skewed towards a few busy customers with many cookies.
            user = f"u{min(rng.randrange(14), rng.randrange(14))}"
            anon = f"a{min(rng.randrange(30), rng.randrange(30))}"
            kind = rng.choice(["track", "track", "page", "identify", "alias"])
            call: dict[str, Any] = {"type": kind, "messageId": f"m{n}",
                                    "timestamp": iso(t0 + n)}
            if kind == "alias":
                previous = anon if rng.random() < 0.7 else f"u{rng.randrange(14)}"
                call.update(userId=user, previousId=previous)
            else:
                ids = rng.choice([("userId",), ("anonymousId",), ("userId", "anonymousId")])
                call.update({name: user if name == "userId" else anon for name in ids})
                if kind == "track":
                    call["event"] = "Clicked"
            calls.append(call)

        async def outcome(data_dir: Path, cache: int) -> tuple[Any, ...]:
            infinario = FakeInfinario()
            async with running(data_dir, infinario, active_customers=cache) as router:
                # Sent without waiting in between, so rounds hold several requests and
                # meet hibernated customers part way through.
                for start in range(0, len(calls), 75):
                    result = await router.submit_batch(calls[start:start + 75], write_key=WK)
                    assert result.rejected == []
                await router.drain()
                activated = router.metrics.get("customers_activated_total")
                ids = await stored_ids(router)
                # session_seen is the wall clock of the last visit: it differs by run.
                states = [(key, replace(state_decoder.decode(blob), session_seen=None))
                          for key, blob in await query(
                              router, "SELECT key, state FROM customers ORDER BY key")]
            commands = sorted(json.dumps(c, sort_keys=True) for c in infinario.commands)
            return activated, ids, states, commands

        small = await outcome(tmp_path / "small", cache)
        large = await outcome(tmp_path / "large", 10_000)
        assert small[0] > 0 and large[0] == 0  # the small cache did read customers back
        assert small[1:] == large[1:]
        assert any(c.startswith('{"data": {"customer_ids"') for c in small[3])


class TestRestart:
    """Identity, merges, group, open sessions and schema limits survive a restart; the open
    session ends later with its own timestamp and duration."""

    async def test_state_survives_a_restart(
        self, tmp_path: Path, autojump_clock: MockClock
    ) -> None:
        infinario = FakeInfinario()
        freeze(autojump_clock)
        timeout = 600.0
        options: dict[str, Any] = {"session_timeout": timeout, "max_customer_keys": 4}
        async with running(tmp_path, infinario, **options) as router:
            t0 = start_time(router)
            await send(router, "page", t0, anonymousId="a1")
            await send(router, "page", t0 + 2, userId="u1")
            await send(router, "alias", t0 + 3, userId="u1", previousId="a1")
            await send(router, "group", t0 + 4, userId="u1", groupId="g1",
                       traits={"name": "Acme", "plan": "pro"})
            await send(router, "identify", t0 + 5, userId="u1", traits={"email": "a@b.c"})
            await router.drain()
            merged = key_of(router, "r:u1")
        # Shutting down does not end the session.
        assert events(infinario, "session_end") == []

        async with running(tmp_path, infinario, **options) as router:
            directory = router.partition
            assert [key for _, key in directory.timers] == [merged]
            await send(router, "track", t0 + 6, anonymousId="a1", event="Came Back")
            await send(router, "group", t0 + 7, userId="u1", groupId="g2")
            await send(router, "identify", t0 + 8, userId="u1",
                       traits={"email": "new@b.c", "phone": "123"})
            await router.drain()

            assert key_of(router, "c:a1") == key_of(router, "r:u1") == merged
            state = directory.states[merged]
            assert (state.registered, state.cookies) == ("u1", ["a1"])
            assert (state.session_start, state.session_last) == (t0, t0 + 2)
            group_move, identify = customers(infinario)[-2:]
            assert group_move["properties"] == {"group_id": "g2", "group_name": None,
                                                "group_plan": None}
            # The customer key limit (4) was filled before the restart: "phone" is new.
            assert identify["properties"] == {"email": "new@b.c"}
            assert router.report()["projects"][PROJECT]["customer_keys"] == 4

            deadline = state.deadline(timeout)
            assert deadline is not None
            thaw(autojump_clock)
            await trio.sleep(max(0.0, deadline - router.wall()) + 1)
            await settle(router, autojump_clock)
            [end] = events(infinario, "session_end")
            assert end["timestamp"] == t0 + 2
            assert end["properties"] == {"duration": 2.0}
            assert len(events(infinario, "session_start")) == 2  # a1's and u1's, pre-merge

    async def test_identity_learned_by_a_refused_call_survives(self, tmp_path: Path) -> None:
        infinario = FakeInfinario()
        async with running(tmp_path, infinario) as router:
            t0 = start_time(router)
            await send(router, "identify", t0, anonymousId="a1")
            # Refused (reserved event type), but it still tells us a1 is u1.
            await send(router, "track", t0 + 1, userId="u1", anonymousId="a1", event="campaign")
            await router.drain()
            assert len(await query(router, "SELECT id FROM dead_letters")) == 1
            customer = key_of(router, "r:u1")

        async with running(tmp_path, infinario) as router:
            # The cookie with another registered id is a shared device, not a second
            # registered id for the same customer.
            await send(router, "identify", t0 + 2, userId="u2", anonymousId="a1")
            await router.drain()
            ids = await stored_ids(router)
            assert ids["r:u1"] == customer
            assert ids["r:u2"] != customer
            assert ids["c:a1"] == ids["r:u2"]
            rows = dict(await query(router, "SELECT key, state FROM customers"))
            first = state_decoder.decode(rows[customer])
            assert (first.registered, first.cookies) == ("u1", [])
            second = state_decoder.decode(rows[ids["r:u2"]])
            assert (second.registered, second.cookies) == ("u2", ["a1"])
