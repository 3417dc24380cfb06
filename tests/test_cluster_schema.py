"""Schema limits shared by many workers: admit.lua decides, SharedSchema caches and re-runs."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

import coredis
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.cluster.keys import Keys
from router.cluster.schema import NeedsSchema, SharedSchema
from router.commands import Command
from router.customer import CustomerState, TurnContext, state_encoder, turn
from router.mapping import EventPolicy, LimitExceeded, Limits, Schema
from router.segment import validate

pytestmark = pytest.mark.redis

PROJECT = "proj"
TIMEOUT = 1200.0
T0 = datetime(2024, 3, 1, 10, 0, 0, tzinfo=UTC).timestamp()
CONTEXT = {"ip": "10.0.0.1", "os": {"name": "iOS"}, "page": {"url": "https://shop.test/"}}
SMALL = Limits(event_types=3, event_keys=3, customer_keys=3)
# A bound on every test: a hung Redis call fails the test instead of stalling the run.
BOUND = 30.0

_projects = itertools.count()


def keys(project: str = PROJECT) -> Keys:
    return Keys(project, 4)


def fresh_keys() -> Keys:
    """A project of its own, for tests that cannot flush Redis between runs."""
    return keys(f"p{next(_projects)}")


@asynccontextmanager
async def client(url: str, decode: bool = True) -> AsyncIterator[coredis.Redis[Any]]:
    # One worker uses bytes replies, the other text: the schema must read both.
    redis: coredis.Redis[Any] = coredis.Redis.from_url(url, decode_responses=decode)
    async with redis:
        yield redis


def msg(kind: str, at: float = T0, **fields: Any) -> dict[str, Any]:
    message = {"type": kind, "timestamp": datetime.fromtimestamp(at, UTC).isoformat(), **fields}
    return validate(message, type_=None, received_at=T0 + 10_000)


def context(schema: Schema) -> TurnContext:
    return TurnContext(PROJECT, schema, EventPolicy(), TIMEOUT)


def outcome(call: Any) -> Any:
    """What a schema call decided: its result, or the refusal's code and message."""
    try:
        return call()
    except LimitExceeded as refusal:
        return ("refused", refusal.code, refusal.reason)


async def members(redis: coredis.Redis[Any], key: str) -> set[str]:
    return {m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(key)}


class TestTurn:
    """The real customer.turn on a SharedSchema: stop before any change, then as embedded."""

    async def test_a_new_event_type_stops_the_turn_then_settles_to_the_embedded_commands(
        self, redis_url: str
    ) -> None:
        message = msg("track", userId="u1", event="Clicked", context=CONTEXT,
                      properties={"button": "buy"})
        shared = SharedSchema(keys())
        state = CustomerState(1, PROJECT)
        before = state_encoder.encode(state)
        with trio.fail_after(BOUND):
            async with client(redis_url) as redis:
                with pytest.raises(NeedsSchema) as stop:
                    turn(state, message, context(shared))
                need = stop.value
                assert (need.event_type, need.new_type) == ("Clicked", True)
                assert need.keys == ("ip", "os_name", "page_url", "button")
                assert state_encoder.encode(state) == before
                assert shared.report() == Schema().report()  # nothing recorded, nothing counted
                assert await redis.keys("*") == set()  # and nothing asked of Redis yet

                await shared.settle(redis, [need])
                commands = turn(state, message, context(shared))
                assert await members(redis, shared.names.types) == {"Clicked"}
                assert await members(redis, shared.names.event("Clicked")) == set(need.keys)

        embedded = Schema()
        assert commands == turn(CustomerState(1, PROJECT), message, context(embedded))
        assert shared.report() == embedded.report()

    async def test_a_page_opens_its_session_as_the_embedded_turn_does(self, redis_url: str) -> None:
        first = msg("page", userId="u1", name="Home", context=CONTEXT)
        later = msg("page", T0 + 2 * TIMEOUT, userId="u1", name="Cart", context=CONTEXT)
        shared, embedded = SharedSchema(keys()), Schema()
        mine, theirs = CustomerState(1, PROJECT), CustomerState(1, PROJECT)
        with trio.fail_after(BOUND):
            async with client(redis_url) as redis:
                for message in (first, later):  # the second closes the first session
                    with pytest.raises(NeedsSchema):
                        turn(mine, message, context(shared))  # page_visit, then session_end
                    assert state_encoder.encode(mine) == state_encoder.encode(theirs)
                    got = await shared.complete(redis, partial(turn, mine, message,
                                                               context(shared)))
                    assert got == turn(theirs, message, context(embedded))
                    assert state_encoder.encode(mine) == state_encoder.encode(theirs)
                assert await members(redis, shared.names.types) == {
                    "page_visit", "session_start", "session_end"}
        assert shared.report() == embedded.report()

    async def test_a_stopped_attempt_counts_its_drops_once(self, redis_url: str) -> None:
        """The visit drops a key, then session_start stops the turn: the re-run counts it once."""
        limits = Limits(event_keys=1)
        message = msg("page", userId="u2", properties={"extra": 2})
        shared, embedded = SharedSchema(keys(), limits), Schema(limits)
        with trio.fail_after(BOUND):
            async with client(redis_url) as redis:
                # page_visit is now full with "seen"; session_start is still unknown here.
                await redis.sadd(shared.names.types, ["page_visit"])
                await redis.sadd(shared.names.event("page_visit"), ["seen"])
                await shared.warm(redis)
                embedded.load("type", "page_visit", "")
                embedded.load("event_key", "page_visit", "seen")
                got = await shared.complete(redis, lambda: turn(
                    CustomerState(2, PROJECT), message, context(shared)))
        assert got == turn(CustomerState(2, PROJECT), message, context(embedded))
        assert got[-1] == Command("event", PROJECT, {"registered": "u2"}, {}, T0, "page_visit")
        assert shared.report()["dropped_event_keys"] == {
            "page_visit": {"count": 1, "keys": ["extra"]}}
        assert shared.report() == embedded.report()


class TestRace:
    """Two workers at the limit, each with a different new name: Redis admits exactly one."""

    @pytest.mark.parametrize("limit", [3, 255])
    async def test_two_workers_race_for_the_last_event_type(
        self, redis_url: str, limit: int
    ) -> None:
        limits = Limits(event_types=limit)
        rounds = 10 if limit < 255 else 1
        with trio.fail_after(BOUND):
            async with client(redis_url) as one, client(redis_url, decode=False) as two:
                for _ in range(rounds):
                    project = fresh_keys()
                    names = SharedSchema(project).names
                    await one.sadd(names.types, [f"t{i}" for i in range(limit - 1)])
                    workers = [(SharedSchema(project, limits), one, "new_a"),
                               (SharedSchema(project, limits), two, "new_b")]
                    results = await race(workers, lambda w, t: w.admit_event(t, {"k": 1}))

                    assert await one.scard(names.types) == limit
                    admitted = [t for t, r in results.items() if r == ({"k": 1}, [])]
                    assert len(admitted) == 1
                    [loser] = set(results) - set(admitted)
                    assert results[loser] == ("refused", "event_type_limit",
                                              f"event type {loser!r} refused: the project "
                                              f"already has {limit} event types (limit {limit})")
                    assert await members(one, names.types) == {
                        *(f"t{i}" for i in range(limit - 1)), admitted[0]}
                    assert await members(one, names.event(admitted[0])) == {"k"}
                    assert await one.exists([names.event(loser)]) == 0

    async def test_two_workers_race_for_the_last_key_of_an_event_type(
        self, redis_url: str
    ) -> None:
        with trio.fail_after(BOUND):
            async with client(redis_url) as one, client(redis_url, decode=False) as two:
                for _ in range(10):
                    project = fresh_keys()
                    names = SharedSchema(project).names
                    await one.sadd(names.types, ["t"])
                    await one.sadd(names.event("t"), ["k0", "k1"])
                    workers = [(SharedSchema(project, SMALL), one, "ka"),
                               (SharedSchema(project, SMALL), two, "kb")]
                    results = await race(workers, lambda w, k: w.admit_event("t", {"k0": 0, k: 1}))

                    assert await one.scard(names.event("t")) == 3
                    kept = [k for k, r in results.items() if r == ({"k0": 0, k: 1}, [])]
                    assert len(kept) == 1
                    [dropped] = set(results) - set(kept)
                    assert results[dropped] == ({"k0": 0}, [dropped])
                    assert await members(one, names.event("t")) == {"k0", "k1", kept[0]}
                    reports = [w.report() for w, _, _ in workers]
                    assert sum(r["dropped_event_keys"].get("t", {}).get("count", 0)
                               for r in reports) == 1


async def race(workers: list[tuple[SharedSchema, coredis.Redis[Any], str]],
               call: Any) -> dict[str, Any]:
    """Both workers find their name undecided, settle at the same time, then re-run."""
    for schema, redis, _ in workers:
        await schema.warm(redis)
    needs = []
    for schema, _, name in workers:
        with pytest.raises(NeedsSchema) as stop:
            call(schema, name)
        needs.append(stop.value)  # both undecided before either asks Redis
    start = trio.Event()

    async def settle(schema: SharedSchema, redis: coredis.Redis[Any], need: NeedsSchema) -> None:
        await start.wait()
        await schema.settle(redis, [need])

    async with trio.open_nursery() as nursery:
        for (schema, redis, _), need in zip(workers, needs, strict=True):
            nursery.start_soon(settle, schema, redis, need)
        start.set()
    return {name: outcome(lambda s=schema, n=name: call(s, n)) for schema, _, name in workers}


class TestCache:
    """What a worker decides alone, and what admit.lua answers when asked twice."""

    async def test_a_warm_worker_decides_known_names_and_full_sets_without_redis(
        self, redis_url: str
    ) -> None:
        with trio.fail_after(BOUND):
            async with client(redis_url) as redis:
                writer = SharedSchema(keys(), SMALL)
                for event_type in ("a", "b", "c"):
                    await writer.complete(redis, partial(writer.admit_event, event_type,
                                                         {"x": 1}))
                await writer.complete(redis, lambda: writer.admit_event("a", {"y": 1, "z": 1}))
                await writer.complete(redis, lambda: writer.admit_customer({"email": 1}))
                reader = SharedSchema(keys(), SMALL)
                await reader.warm(redis)
        # No client from here on: a NeedsSchema would fail the test.
        assert reader.admit_event("b", {"x": 2}) == ({"x": 2}, [])
        assert reader.admit_event("a", {"x": 1, "w": 1}) == ({"x": 1}, ["w"])  # a is full
        with pytest.raises(LimitExceeded, match="already has 3 event types"):
            reader.admit_event("d", {})
        assert reader.admit_customer({"email": 2}) == ({"email": 2}, [])
        with pytest.raises(NeedsSchema) as stop:
            reader.admit_customer({"email": 2, "phone": 3})
        assert (stop.value.event_type, stop.value.keys) == (None, ("phone",))
        assert reader.report()["refused_total"] == 1
        assert reader.drain_new() == []

    async def test_admit_gives_the_same_answers_when_run_again(self, redis_url: str) -> None:
        """A retried call (the client may resend a script) changes nothing and answers alike."""
        need = NeedsSchema("t", True, ("a", "b", "c", "d"))
        customer = NeedsSchema(None, False, ("e", "f", "g", "h"))
        refused = NeedsSchema("u", True, ("z",))
        with trio.fail_after(BOUND):
            async with client(redis_url) as redis:
                one = SharedSchema(keys(), Limits(event_types=1, event_keys=3, customer_keys=2))
                await one.settle(redis, [need, customer, refused])
                again = SharedSchema(keys(), Limits(event_types=1, event_keys=3, customer_keys=2))
                await again.settle(redis, [need, customer, refused])
                names = one.names
                assert await members(redis, names.types) == {"t"}
                assert await members(redis, names.event("t")) == {"a", "b", "c"}
                assert await members(redis, names.customer) == {"e", "f"}
                assert await redis.exists([names.event("u")]) == 0
        for schema in (one, again):
            assert schema.admit_event("t", {"a": 1, "d": 1}) == ({"a": 1}, ["d"])
            assert schema.admit_customer({"e": 1, "h": 1}) == ({"e": 1}, ["h"])
            with pytest.raises(LimitExceeded):
                schema.admit_event("u", {"z": 1})


# A few names, so sets fill up and names repeat.
_names = st.sampled_from(["a", "b", "c", "d", "e"])
_ops = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from(["event", "customer"]), _names,
              st.lists(_names, unique=True, max_size=4)),
    max_size=12,
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, limits=st.builds(Limits, customer_keys=st.integers(0, 3),
                                  event_keys=st.integers(0, 3), event_types=st.integers(0, 3)))
async def test_shared_schemas_keep_and_drop_what_schema_does(
    redis_url: str, ops: list[tuple[int, str, str, list[str]]], limits: Limits
) -> None:
    """Two workers taking turns on one project decide every call as one embedded Schema."""
    embedded = Schema(limits)
    project = fresh_keys()
    with trio.fail_after(BOUND):
        async with client(redis_url) as one, client(redis_url, decode=False) as two:
            workers = [(SharedSchema(project, limits), one), (SharedSchema(project, limits), two)]
            for worker, kind, event_type, names in ops:
                props = {name: i for i, name in enumerate(names)}
                shared, redis = workers[worker]
                if kind == "event":
                    expected = outcome(partial(embedded.admit_event, event_type, props))
                    attempt = partial(outcome, partial(shared.admit_event, event_type, props))
                else:
                    expected = outcome(partial(embedded.admit_customer, props))
                    attempt = partial(outcome, partial(shared.admit_customer, props))
                assert await shared.complete(redis, attempt) == expected
            fresh = SharedSchema(project, limits)
            await fresh.warm(one)

    want = embedded.report()
    have = fresh.report()
    for field in ("event_types", "customer_keys", "event_keys"):
        assert have[field] == want[field]
    reports = [w.report() for w, _ in workers]
    assert sum(r["refused_total"] for r in reports) == want["refused_total"]
    assert sum(r["dropped_customer_keys"]["count"] for r in reports) == \
        want["dropped_customer_keys"]["count"]
    assert sum(s["count"] for r in reports for s in r["dropped_event_keys"].values()) == \
        sum(s["count"] for s in want["dropped_event_keys"].values())
