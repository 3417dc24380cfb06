"""route.lua: dedup, the identity rules of ``Identity.resolve`` and the routed append,
checked on a real redis-server, rule by rule and against the Python rules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import coredis
import pytest
import trio
from coredis.exceptions import ResponseError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

from router import identity
from router.cluster.keys import Keys
from router.cluster.route import DUPLICATE, REFUSED, Call, Route, Routed
from router.cluster.scripts import source
from router.customer import CustomerState, merge_into
from router.identity import Changes, Identity
from router.mapping import LimitExceeded

pytestmark = pytest.mark.redis

PROJECT = "p"
WINDOW = 3600.0
NOW = 1_000_000_000.0  # a fixed clock: dedup slots are a function of it
Entry = dict[str, str]


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(url) as client:
        yield client


def msg(n: int, kind: str = "track", *, user: str | None = None, anon: str | None = None,
        previous: str | None = None, message_id: str | None = None) -> dict[str, Any]:
    """A validated Segment message; ``n`` names it in its body."""
    message: dict[str, Any] = {"type": kind, "messageId": message_id or f"m{n}", "n": n}
    for name, value in (("userId", user), ("anonymousId", anon), ("previousId", previous)):
        if value is not None:
            message[name] = value
    return message


def calls(messages: Sequence[dict[str, Any]]) -> list[Call]:
    return [Call.of(m, json.dumps(m).encode()) for m in messages]


def decode(values: Any) -> Entry:
    return {k.decode(): v.decode() for k, v in values.items()}


async def stream(client: coredis.Redis[bytes], key: str) -> list[Entry]:
    return [decode(entry.field_values) for entry in await client.xrange(key)]


async def streams(client: coredis.Redis[bytes], keys: Keys) -> dict[int, list[Entry]]:
    return {p: await stream(client, keys.inbox(p)) for p in range(keys.partitions)}


def numbered(entries: list[Entry]) -> list[tuple[str, ...]]:
    """Entries made readable: a message by its ``n``, a control entry by its fields."""
    shown: list[tuple[str, ...]] = []
    for e in entries:
        if "c" in e:
            shown.append(("k=" + e["k"], e["c"], e["v"]))
        else:
            extra = tuple(f"{name}={e[name]}" for name in "mraft" if name in e)
            shown.append(("k=" + e["k"], "n=" + str(json.loads(e["b"])["n"]), *extra))
    return shown


@dataclass
class Directory:
    ids: dict[str, int]
    registered: dict[int, str]
    forward: dict[int, int]
    cookies: dict[int, list[str]]
    next_key: int


async def directory(client: coredis.Redis[bytes], keys: Keys) -> Directory:
    cookie_lists = {}
    for name in await client.keys(keys.cookies_prefix + "*"):
        key = int(name.decode().rsplit(":", 1)[1])
        cookie_lists[key] = [c.decode() for c in await client.lrange(name, 0, -1)]
    return Directory(
        ids={k.decode(): int(v) for k, v in (await client.hgetall(keys.ids)).items()},
        registered={int(k): v.decode() for k, v in (await client.hgetall(keys.registered)).items()},
        forward={int(k): int(v) for k, v in (await client.hgetall(keys.forward)).items()},
        cookies=cookie_lists,
        next_key=int(await client.get(keys.next_key) or 0),
    )


class Fixture:
    """A client, the script and one project's keys."""

    def __init__(self, client: coredis.Redis[bytes], partitions: int = 4,
                 window: float = WINDOW) -> None:
        self.client = client
        self.keys = Keys(PROJECT, partitions)
        self.route = Route(client, window=window)

    async def send(self, *messages: dict[str, Any], write_key: str = "wk",
                   now: float = NOW) -> Routed:
        return await self.route.route(self.keys, write_key, calls(messages), now=now)

    async def entries(self) -> dict[int, list[tuple[str, ...]]]:
        return {p: numbered(e) for p, e in (await streams(self.client, self.keys)).items() if e}


@pytest.fixture
async def fx(redis_url: str) -> AsyncIterator[Fixture]:
    async with connect(redis_url) as client:
        yield Fixture(client)


# --- identity rules, one by one ----------------------------------------------------------------


async def test_new_customers_are_numbered_in_order_and_land_in_key_mod_partitions(
        fx: Fixture) -> None:
    routed = await fx.send(msg(1, anon="A"), msg(2, user="U"), msg(3, user="V", anon="B"))
    assert routed == Routed(3, 0, 0, (1, 2, 3))
    assert await fx.entries() == {
        1: [("k=1", "n=1", "a=A")],
        2: [("k=2", "n=2", "r=U")],
        3: [("k=3", "n=3", "r=V", "a=B")],
    }
    d = await directory(fx.client, fx.keys)
    assert d.ids == {"c:A": 1, "r:U": 2, "r:V": 3, "c:B": 3}
    assert d.registered == {2: "U", 3: "V"}
    assert d.cookies == {1: ["A"], 3: ["B"]}
    assert d.next_key == 3


async def test_entries_carry_the_write_key_and_the_body_as_given(fx: Fixture) -> None:
    body = b'{"type":"track","weird \xff bytes":1}'
    await fx.route.route(fx.keys, "key-1", [Call("m1", False, "U", None, body)], now=NOW)
    raw = await fx.client.xrange(fx.keys.inbox(1))
    assert [e.field_values for e in raw] == [{b"k": b"1", b"w": b"key-1", b"b": body,
                                              b"r": b"U"}]


async def test_a_new_cookie_is_linked_to_the_known_customer(fx: Fixture) -> None:
    await fx.send(msg(1, user="U"))
    routed = await fx.send(msg(2, user="U", anon="A"), msg(3, anon="A"))
    assert routed.outcomes == (1, 1)
    assert await fx.entries() == {1: [("k=1", "n=1", "r=U"), ("k=1", "n=2", "a=A"),
                                      ("k=1", "n=3")]}
    assert (await directory(fx.client, fx.keys)).cookies == {1: ["A"]}


async def test_a_registered_id_joins_a_cookie_only_customer(fx: Fixture) -> None:
    routed = await fx.send(msg(1, anon="A"), msg(2, "identify", user="U", anon="A"),
                           msg(3, user="U"))
    assert routed.outcomes == (1, 1, 1)
    assert await fx.entries() == {1: [("k=1", "n=1", "a=A"), ("k=1", "n=2", "r=U"),
                                      ("k=1", "n=3")]}
    d = await directory(fx.client, fx.keys)
    assert d.registered == {1: "U"} and d.ids == {"c:A": 1, "r:U": 1}


async def test_an_anonymous_customer_merges_into_a_registered_one_across_partitions(
        fx: Fixture) -> None:
    # U is customer 1 (partition 1), the anonymous A customer 2 (partition 2).
    await fx.send(msg(1, user="U", anon="X"), msg(2, anon="A"), msg(3, anon="A"))
    routed = await fx.send(msg(4, "identify", user="U", anon="A"), msg(5, anon="A"))
    assert routed.outcomes == (1, 1)
    assert await fx.entries() == {
        # The merging message carries m=2 in the survivor's partition, after its own history.
        1: [("k=1", "n=1", "r=U", "a=X"), ("k=1", "n=4", "m=2"), ("k=1", "n=5")],
        # The hand-off marker follows every message of the merged customer.
        2: [("k=2", "n=2", "a=A"), ("k=2", "n=3"), ("k=2", "handoff", "1")],
    }
    d = await directory(fx.client, fx.keys)
    assert d.forward == {2: 1}
    assert d.ids == {"r:U": 1, "c:X": 1, "c:A": 1}
    assert d.cookies == {1: ["X", "A"]}  # the merged customer's list is gone
    assert d.registered == {1: "U"}


async def test_a_same_partition_merge_also_hands_off_first(redis_url: str) -> None:
    async with connect(redis_url) as client:
        fx = Fixture(client, partitions=1)
        await fx.send(msg(1, user="U"), msg(2, anon="A"))
        await fx.send(msg(3, "alias", user="U", previous="A"))
        assert await fx.entries() == {0: [("k=1", "n=1", "r=U"), ("k=2", "n=2", "a=A"),
                                          ("k=2", "handoff", "1"), ("k=1", "n=3", "m=2")]}


async def test_a_cookie_seen_with_another_registered_id_moves_to_a_new_customer(
        fx: Fixture) -> None:
    await fx.send(msg(1, user="U", anon="A"), msg(2, user="U", anon="B"))
    routed = await fx.send(msg(3, user="V", anon="A"))
    assert routed.outcomes == (2,)  # a shared device: V is a new customer, not U
    assert await fx.entries() == {
        # The old owner drops the cookie in its own partition's order.
        1: [("k=1", "n=1", "r=U", "a=A"), ("k=1", "n=2", "a=B"), ("k=1", "drop", "A")],
        2: [("k=2", "n=3", "r=V", "a=A", "f=1")],
    }
    d = await directory(fx.client, fx.keys)
    assert d.cookies == {1: ["B"], 2: ["A"]}
    assert d.ids == {"r:U": 1, "c:A": 2, "c:B": 1, "r:V": 2}
    assert d.forward == {}


async def test_a_cookie_moves_between_two_registered_customers_without_a_merge(
        fx: Fixture) -> None:
    await fx.send(msg(1, user="U", anon="A"), msg(2, user="V"))
    routed = await fx.send(msg(3, user="V", anon="A"))
    assert routed.outcomes == (2,)
    assert await fx.entries() == {
        1: [("k=1", "n=1", "r=U", "a=A"), ("k=1", "drop", "A")],
        2: [("k=2", "n=2", "r=V"), ("k=2", "n=3", "a=A", "f=1")],
    }
    d = await directory(fx.client, fx.keys)
    assert d.registered == {1: "U", 2: "V"} and d.forward == {}
    assert d.cookies == {2: ["A"]}


async def test_an_alias_to_another_customers_registered_id_is_refused(fx: Fixture) -> None:
    await fx.send(msg(1, user="U"), msg(2, user="V", anon="A"))
    before = (await directory(fx.client, fx.keys), await fx.entries())
    routed = await fx.send(msg(3, "alias", user="V", previous="U"),
                           msg(4, "alias", user="W", previous="U"))
    assert routed == Routed(0, 0, 2, (REFUSED, REFUSED))
    assert (await directory(fx.client, fx.keys), await fx.entries()) == before
    letters = await stream(fx.client, fx.keys.dead_letters)
    assert [(e["code"], e["reason"], e["w"], json.loads(e["b"])["n"]) for e in letters] == [
        ("alias_registered", identity.alias_refused("U").reason, "wk", 3),
        ("alias_registered", identity.alias_refused("U").reason, "wk", 4),
    ]
    assert "previousId 'U' is another customer's registered id" in letters[0]["reason"]


async def test_an_alias_whose_previous_id_is_its_own_registered_id_is_linked_as_a_cookie(
        fx: Fixture) -> None:
    await fx.send(msg(1, user="U"))
    routed = await fx.send(msg(2, "alias", user="U", previous="U", anon="ignored"))
    assert routed.outcomes == (1,)
    assert (await directory(fx.client, fx.keys)).ids == {"r:U": 1, "c:U": 1}


async def test_the_oldest_cookies_leave_past_max_cookies(
        fx: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "MAX_COOKIES", 2)  # small, so trimming happens often
    await fx.send(msg(1, user="U", anon="A"), msg(2, user="U", anon="B"),
                  msg(3, user="U", anon="C"))
    assert await fx.entries() == {1: [("k=1", "n=1", "r=U", "a=A"), ("k=1", "n=2", "a=B"),
                                      ("k=1", "n=3", "a=C", "t=1")]}
    d = await directory(fx.client, fx.keys)
    assert d.cookies == {1: ["B", "C"]}
    assert "c:A" not in d.ids  # A is a stranger again
    assert (await fx.send(msg(4, anon="A"))).outcomes == (2,)


async def test_a_merge_past_max_cookies_trims_the_survivors_oldest(
        fx: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "MAX_COOKIES", 2)  # small, so trimming happens often
    await fx.send(msg(1, user="U", anon="A"), msg(2, anon="B"))
    await fx.send(msg(3, user="U", anon="B"))
    assert (await fx.entries())[1][-1] == ("k=1", "n=3", "m=2")  # 2 cookies: nothing to trim
    await fx.send(msg(4, anon="C"), msg(5, anon="D"), msg(6, anon="C", user="U"))
    assert (await fx.entries())[1][-1] == ("k=1", "n=6", "m=3", "t=1")
    assert (await directory(fx.client, fx.keys)).cookies == {1: ["B", "C"], 4: ["D"]}


# --- dedup ---------------------------------------------------------------------------------------


async def test_a_repeated_message_id_is_skipped_before_any_identity_effect(fx: Fixture) -> None:
    await fx.send(msg(1, user="U", message_id="same"))
    before = await directory(fx.client, fx.keys)
    # The same id with other ids (and a merge it would cause): nothing happens.
    routed = await fx.send(msg(2, user="V", anon="A", message_id="same"),
                           msg(3, anon="B"), msg(4, anon="B", message_id="m3"))
    assert routed == Routed(1, 2, 0, (DUPLICATE, 2, DUPLICATE))
    after = await directory(fx.client, fx.keys)
    assert after.next_key == 2 and "r:V" not in after.ids and "c:A" not in after.ids
    assert after.registered == before.registered
    assert await fx.entries() == {1: [("k=1", "n=1", "r=U")], 2: [("k=2", "n=3", "a=B")]}


async def test_dedup_is_per_write_key(fx: Fixture) -> None:
    assert (await fx.send(msg(1, user="U"), write_key="k1")).outcomes == (1,)
    assert (await fx.send(msg(1, user="U"), write_key="k2")).outcomes == (1,)
    assert (await fx.send(msg(1, user="U"), write_key="k1")).outcomes == (DUPLICATE,)
    assert [e["w"] for e in await stream(fx.client, fx.keys.inbox(1))] == ["k1", "k2"]


async def test_an_id_is_remembered_for_the_window_and_forgotten_two_slots_later(
        fx: Fixture) -> None:
    start = (NOW // WINDOW) * WINDOW + 0.9 * WINDOW  # late in a slot
    assert (await fx.send(msg(1, user="U"), now=start)).outcomes == (1,)
    # The next slot still sees it (the previous slot is checked)...
    assert (await fx.send(msg(1, user="U"), now=start + 0.99 * WINDOW)).outcomes == (DUPLICATE,)
    # ...the one after that has forgotten it: the write is routed again.
    assert (await fx.send(msg(1, user="U"), now=start + 1.2 * WINDOW)).outcomes == (1,)
    # The slot's hashes expire two windows after the slot began, not later.
    names = await fx.client.keys("dd:*")
    assert names
    for name in names:
        ttl = await fx.client.pttl(name)
        assert 0 < ttl <= 2 * WINDOW * 1000, (name, ttl)


async def test_dedup_hashes_stay_small_enough_for_the_compact_encoding(fx: Fixture) -> None:
    routed = await fx.send(*(msg(n, anon=f"a{n}") for n in range(300)))
    assert routed.routed == 300
    names = await fx.client.keys("dd:*")
    assert len(names) > 100  # spread over buckets, not one big hash per slot
    for name in names:
        assert await fx.client.object_encoding(name) == b"listpack", name


async def test_the_dedup_slots_really_expire(redis_url: str) -> None:
    async with connect(redis_url) as client:
        fx = Fixture(client, window=0.2)
        routed = await fx.route.route(fx.keys, "wk", calls([msg(1, user="U")]))
        assert routed.outcomes == (1,)
        assert await client.keys("dd:*")
        await trio.sleep(0.5)  # two windows and a half: both slots that could hold it are gone
        assert not await client.keys("dd:*")
        again = await fx.route.route(fx.keys, "wk", calls([msg(1, user="U")]))
        assert again.outcomes == (1,)


async def test_a_request_run_twice_appends_each_message_once(fx: Fixture) -> None:
    await fx.send(msg(1, user="U"), msg(2, anon="A"))
    request = (msg(3, user="U", anon="A"), msg(4, user="V", anon="A"),
               msg(5, "alias", user="V", previous="U"), msg(6, anon="B"))
    first = await fx.send(*request)
    assert first == Routed(3, 0, 1, (1, 3, REFUSED, 4))
    state = (await directory(fx.client, fx.keys), await fx.entries(),
             await stream(fx.client, fx.keys.dead_letters))
    # The same EVALSHA again, as a client retry after a lost reply sends it.
    second = await fx.send(*request)
    assert second == Routed(0, 4, 0, (DUPLICATE,) * 4)
    assert (await directory(fx.client, fx.keys), await fx.entries(),
            await stream(fx.client, fx.keys.dead_letters)) == state
    ns = [n for entries in state[1].values() for e in entries for n in e if n.startswith("n=")]
    assert sorted(ns) == ["n=1", "n=2", "n=3", "n=4", "n=6"]


# --- the contract -------------------------------------------------------------------------------


def test_call_reads_the_ids_resolve_reads() -> None:
    alias = msg(1, "alias", user="U", previous="P", anon="ignored")
    assert Call.of(alias, b"x") == Call("m1", True, "U", "P", b"x")
    assert Call.of(msg(2, anon="A"), b"y") == Call("m2", False, None, "A", b"y")


async def test_the_script_refuses_arguments_that_do_not_match(fx: Fixture) -> None:
    script = fx.client.register_script(source("route"))
    with pytest.raises(ResponseError, match="do not describe 1 messages"):
        await script([fx.keys.ids, "b", "c", "d", "e"], ["wk", 1, 3, 4, "in:", "ck:", 1])


# --- the differential test ---------------------------------------------------------------------

USERS = ("u0", "u1", "u2")
COOKIES = ("c0", "c1", "c2", "c3")


class Memory:
    """``identity.Customers`` in a dict; keys are numbered in creation order, from 1."""

    def __init__(self) -> None:
        self.states: dict[int, CustomerState] = {}
        self.created = 0

    def get(self, key: int) -> CustomerState | None:
        return self.states.get(key)

    def create(self, project: str) -> CustomerState:
        self.created += 1
        state = self.states[self.created] = CustomerState(self.created, project)
        return state

    def drop(self, key: int) -> None:
        del self.states[key]


@dataclass
class Reference:
    """What the Python rules make of the same calls."""

    outcomes: list[object] = field(default_factory=list)  # per message, as route.lua reports
    effects: dict[int, tuple[int | None, int | None, int]] = field(default_factory=dict)
    after: dict[int, tuple[str | None, list[str]]] = field(default_factory=dict)
    merges: dict[int, int] = field(default_factory=dict)
    refusals: list[tuple[int, str]] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    identity: Identity = field(default_factory=Identity)


def reference(requests: list[tuple[str, list[dict[str, Any]]]]) -> Reference:
    ref = Reference()
    seen: set[tuple[str, str]] = set()
    for write_key, messages in requests:
        for message in messages:
            if (write_key, message["messageId"]) in seen:
                ref.outcomes.append(DUPLICATE)
                continue
            seen.add((write_key, message["messageId"]))
            cookie = message["previousId"] if message["type"] == "alias" else message.get(
                "anonymousId")
            owner = None if cookie is None else ref.identity.index.get((PROJECT, "c:" + cookie))
            changes = Changes()
            try:
                state = ref.identity.resolve(PROJECT, message, ref.memory, changes,
                                             lambda survivor, had_session: None)
            except LimitExceeded as refusal:
                ref.outcomes.append(REFUSED)
                ref.refusals.append((message["n"], refusal.reason))
                continue
            ref.outcomes.append(state.key)
            merged = next(iter(changes.deleted), None)
            if merged is not None:
                ref.merges[merged] = state.key
            moved_from = owner if changes.cookies_moved else None
            ref.effects[message["n"]] = (merged, moved_from, changes.cookies_dropped)
            ref.after[message["n"]] = (state.registered, list(state.cookies))
    return ref


def replay(partitions: dict[int, list[Entry]]) -> tuple[dict[int, CustomerState],
                                                         dict[int, tuple[str | None, list[str]]]]:
    """A partition worker's handling of the ids, from the streams alone: each partition in
    order; a merging message waits until its merged customer's hand-off was read."""
    states: dict[int, CustomerState] = {}
    handed: dict[int, tuple[int, CustomerState]] = {}
    after: dict[int, tuple[str | None, list[str]]] = {}
    heads = dict.fromkeys(partitions, 0)
    while any(heads[p] < len(entries) for p, entries in partitions.items()):
        progressed = False
        for p, entries in partitions.items():
            while heads[p] < len(entries):
                e = entries[heads[p]]
                if "m" in e and int(e["m"]) not in handed:
                    break
                heads[p] += 1
                progressed = True
                k = int(e["k"])
                if e.get("c") == "handoff":
                    handed[k] = (int(e["v"]), states.pop(k))
                elif e.get("c") == "drop":
                    states[k].cookies.remove(e["v"])
                else:
                    state = states.setdefault(k, CustomerState(k, PROJECT))
                    if "m" in e:
                        survivor, merged = handed.pop(int(e["m"]))
                        assert survivor == k
                        merge_into(state, merged)
                    if "r" in e:
                        state.registered = e["r"]
                    if "a" in e:
                        state.cookies.append(e["a"])
                    del state.cookies[:int(e.get("t", 0))]
                    after[json.loads(e["b"])["n"]] = (state.registered, list(state.cookies))
        assert progressed, f"the streams wait on each other at {heads}"
    assert not handed, f"hand-offs no merge took: {handed}"
    return states, after


def _message(n: int, draw: hs.DrawFn) -> dict[str, Any]:
    # A few ids come from a small pool, so some repeat (duplicates for the same write key).
    pooled = draw(hs.integers(0, 7))
    message_id = f"pool{pooled}" if pooled < 2 else f"m{n}"
    kind = draw(hs.sampled_from(("identify", "track", "page", "alias")))
    if kind == "alias":
        return msg(n, kind, user=draw(hs.sampled_from(USERS)),
                   previous=draw(hs.sampled_from(USERS + COOKIES)),
                   anon=draw(hs.none() | hs.sampled_from(COOKIES)), message_id=message_id)
    user = draw(hs.none() | hs.sampled_from(USERS))
    anon = draw(hs.sampled_from(COOKIES) if user is None else hs.none() | hs.sampled_from(COOKIES))
    return msg(n, kind, user=user, anon=anon, message_id=message_id)


@hs.composite
def call_sequences(draw: hs.DrawFn) -> list[tuple[str, list[dict[str, Any]]]]:
    requests = []
    n = 0
    for _ in range(draw(hs.integers(1, 8))):
        messages = []
        for _ in range(draw(hs.integers(1, 5))):
            n += 1
            messages.append(_message(n, draw))
        requests.append((draw(hs.sampled_from(("wk1", "wk2"))), messages))
    return requests


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call_sequences())
async def test_route_lua_resolves_as_identity_resolve_does(
        redis_url: str, monkeypatch: pytest.MonkeyPatch,
        requests: list[tuple[str, list[dict[str, Any]]]]) -> None:
    monkeypatch.setattr(identity, "MAX_COOKIES", 2)  # small, so trimming happens often
    ref = reference(requests)
    async with connect(redis_url) as client:
        await client.flushdb()
        fx = Fixture(client, partitions=3)
        outcomes: list[object] = []
        for write_key, messages in requests:
            routed = await fx.route.route(fx.keys, write_key, calls(messages), now=NOW)
            assert (routed.routed, routed.duplicates, routed.refused) == (
                sum(isinstance(o, int) for o in routed.outcomes),
                routed.outcomes.count(DUPLICATE), routed.outcomes.count(REFUSED))
            outcomes += routed.outcomes
        parts = await streams(client, fx.keys)
        letters = await stream(client, fx.keys.dead_letters)
        d = await directory(client, fx.keys)

    crossing = any(k % fx.keys.partitions != s % fx.keys.partitions
                   for k, s in ref.merges.items())
    for name, seen in (("duplicate", DUPLICATE in ref.outcomes), ("refusal", ref.refusals),
                       ("merge", ref.merges), ("cross-partition merge", crossing),
                       ("cookie move", any(f for _, f, _ in ref.effects.values())),
                       ("trim", any(t for _, _, t in ref.effects.values()))):
        if seen:
            event(name)
    # Per message: the same customer (same numbering), or the same duplicate or refusal...
    assert outcomes == ref.outcomes
    # ...the same merge, cookie move and trim...
    effects = {json.loads(e["b"])["n"]: (int(e["m"]) if "m" in e else None,
                                          int(e["f"]) if "f" in e else None, int(e.get("t", 0)))
               for entries in parts.values() for e in entries if "c" not in e}
    assert effects == ref.effects
    assert sorted(int(e["k"]) for es in parts.values() for e in es if e.get("c") == "handoff") \
        == sorted(ref.merges)
    assert [(json.loads(e["b"])["n"], e["reason"]) for e in letters] == ref.refusals
    # ...and a worker reading the streams sees each customer's ids as the Python rules left them.
    states, after = replay(parts)
    assert after == ref.after
    live = ref.memory.states
    assert {k: (s.registered, s.cookies) for k, s in states.items()} == {
        k: (s.registered, s.cookies) for k, s in live.items()}

    # The directory at the end.
    assert d.ids == {key: k for (_, key), k in ref.identity.index.items()}
    assert d.registered == {k: s.registered for k, s in live.items() if s.registered is not None}
    assert d.cookies == {k: s.cookies for k, s in live.items() if s.cookies}
    assert d.forward == ref.merges
    assert d.next_key == ref.memory.created
