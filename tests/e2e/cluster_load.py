"""Load for the multi-process failure test: households of people and devices, and clients.

A *household* is a few registered people and the devices they share. Its messages
go through every identity rule: anonymous browsing on a new cookie, then a login
that merges it into a registered customer (across partitions, mostly), a login on
a device last used by someone else (the cookie moves), aliases (a new cookie is
linked; another person's registered id is refused), pages, tracks, server-side
calls and long pauses that end a session. No id is shared between households, so
what a household's messages do depends only on their own order.

A *client* owns some households and sends their messages in batches, one batch at
a time, resending a batch until a relay answers 200 (a Segment client behind a
load balancer). Each household's messages are therefore routed in the order they
were made, whatever the interleaving with other clients: that is the order a
reference relay is fed too.

Every message is recognisable in what reaches Infinario: ``seq`` (unique,
increasing within a household) is in a track's and a page's properties, in the
context (hence in a ``session_start``), and in an identify's traits. An alias
carries no properties: its command is known by its pair of ids, made unique.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from router.customer import CustomerState
from router.identity import Changes, Identity
from router.mapping import LimitExceeded

BASE_TIME = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
GAP = 1500.0  # seconds: more than the session timeout (1200), so the session ends
EVENTS = ("Viewed Product", "Added To Cart", "Order Completed", "Searched")
PAGES = ("home", "catalog", "product", "cart", "checkout")
PLANS = ("free", "basic", "pro", "team")


@dataclass
class Message:
    household: int
    seq: int  # unique, increasing within the household
    body: dict[str, Any]

    @property
    def message_id(self) -> str:
        return str(self.body["messageId"])


@dataclass
class Household:
    index: int
    people: list[str]
    devices: list[str]  # shared devices, used by several people over time
    messages: list[Message] = field(default_factory=list)
    clock: float = 0.0
    fresh: int = 0  # cookies made so far
    aliased: set[tuple[str, str]] = field(default_factory=set)

    def cookie(self) -> str:
        self.fresh += 1
        return f"h{self.index}-c{self.fresh}"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class Generator:
    """Makes households' messages; ``run`` tags messageIds so runs never collide."""

    def __init__(self, seed: int, run: str) -> None:
        self.rng = random.Random(seed)
        self.run = run

    def household(self, index: int, size: int) -> Household:
        rng = self.rng
        h = Household(index, [f"h{index}-u{i}" for i in range(rng.randint(1, 3))],
                      [f"h{index}-d{i}" for i in range(rng.randint(1, 3))])
        h.clock = BASE_TIME + rng.uniform(0, 86_400)
        while len(h.messages) < size:
            self._step(h)
        return h

    def _add(self, h: Household, kind: str, *, user: str | None = None,
             cookie: str | None = None, **extra: Any) -> None:
        rng = self.rng
        h.clock += rng.uniform(1, 90)
        seq = h.index * 100_000 + len(h.messages)
        body: dict[str, Any] = {"type": kind, "messageId": f"{self.run}-{seq}",
                                "timestamp": _iso(h.clock), "context": {"seq": seq}}
        if user is not None:
            body["userId"] = user
        if cookie is not None:
            body["anonymousId"] = cookie
        if kind == "track":
            body["event"] = rng.choice(EVENTS)
            body["properties"] = {"seq": seq, "sku": f"sku-{rng.randint(1, 40)}"}
        elif kind == "page":
            body["name"] = rng.choice(PAGES)
            body["properties"] = {"seq": seq, "url": f"https://shop.test/{seq}"}
        elif kind == "identify":
            body["traits"] = {"seq": seq, "plan": rng.choice(PLANS)}
        body.update(extra)
        h.messages.append(Message(h.index, seq, body))

    def _browse(self, h: Household, n: int, *, user: str | None, cookie: str | None) -> None:
        for _ in range(n):
            self._add(h, self.rng.choice(("page", "page", "track")), user=user, cookie=cookie)

    def _step(self, h: Household) -> None:
        rng = self.rng
        r = rng.random()
        person = rng.choice(h.people)
        if r < 0.45:
            # Anonymous browsing, then (mostly) a login: a merge when the person is known.
            device = h.cookie() if rng.random() < 0.6 else rng.choice(h.devices)
            self._browse(h, rng.randint(1, 4), user=None, cookie=device)
            if rng.random() < 0.8:
                self._add(h, "identify", user=person, cookie=device)
                self._browse(h, rng.randint(0, 3), user=person, cookie=device)
        elif r < 0.62:
            device = rng.choice(h.devices) if rng.random() < 0.5 else None
            self._browse(h, rng.randint(1, 4), user=person, cookie=device)
        elif r < 0.74:
            # Someone logs in on a shared device last used by someone else: it moves.
            device = rng.choice(h.devices)
            self._add(h, "identify", user=person, cookie=device)
            self._browse(h, rng.randint(0, 2), user=person, cookie=device)
        elif r < 0.82:
            others = [p for p in h.people if p != person]
            pick = rng.random()
            if pick < 0.35 and others:
                previous = rng.choice(others)  # another person's registered id: refused
            elif pick < 0.55:
                previous = rng.choice(h.devices)
            else:
                previous = h.cookie()
            if (person, previous) not in h.aliased:
                h.aliased.add((person, previous))
                self._add(h, "alias", user=person, previousId=previous)
        elif r < 0.86:
            h.clock += GAP + rng.uniform(0, 600)
        else:
            self._add(h, "track", user=person)


@dataclass
class Scenario:
    """Households, their messages by seq, and each client's batches in sending order."""

    households: list[Household]
    by_seq: dict[int, Message]
    by_alias: dict[tuple[str, str], int]  # (userId, previousId) -> seq
    clients: list[list[list[Message]]]

    @property
    def messages(self) -> Iterator[Message]:
        for h in self.households:
            yield from h.messages


def scenario(seed: int, run: str, *, households: int, per_household: int, clients: int,
             batch: tuple[int, int] = (20, 80)) -> Scenario:
    gen = Generator(seed, run)
    homes = [gen.household(i, gen.rng.randint(per_household // 2, per_household * 3 // 2))
             for i in range(households)]
    by_seq = {m.seq: m for h in homes for m in h.messages}
    by_alias = {(m.body["userId"], m.body["previousId"]): m.seq
                for m in by_seq.values() if m.body["type"] == "alias"}
    rng = random.Random(seed + 1)
    mine: list[list[Household]] = [homes[c::clients] for c in range(clients)]
    out: list[list[list[Message]]] = []
    for owned in mine:
        queues = [list(h.messages) for h in owned]
        batches: list[list[Message]] = []
        current: list[Message] = []
        size = rng.randint(*batch)
        while any(queues):
            queue = rng.choice([q for q in queues if q])
            take = rng.randint(1, 5)
            current += queue[:take]
            del queue[:take]
            if len(current) >= size:
                batches.append(current)
                current, size = [], rng.randint(*batch)
        if current:
            batches.append(current)
        out.append(batches)
    return Scenario(homes, by_seq, by_alias, out)


def encode(batch: list[Message]) -> bytes:
    return json.dumps({"batch": [m.body for m in batch]}).encode()


# --- the reference: the embedded relay's identity rules, household by household ---------------


class _Customers:
    def __init__(self) -> None:
        self.states: dict[int, CustomerState] = {}
        self.next = 1

    def get(self, key: int) -> CustomerState | None:
        return self.states.get(key)

    def create(self, project: str) -> CustomerState:
        state = self.states[self.next] = CustomerState(self.next, project)
        self.next += 1
        return state

    def drop(self, key: int) -> None:
        self.states.pop(key, None)


@dataclass
class Resolved:
    """What ``Identity.resolve`` made of every message, in household order."""

    customer: dict[int, int]  # seq -> reference customer key (absent: refused)
    refused: set[int]  # seqs of refused aliases
    merges: list[tuple[int, int, int]]  # (seq of the merging message, merged key, survivor)
    moves: int  # cookies that moved to another registered customer
    states: dict[int, CustomerState]  # final states by reference key
    created: dict[int, int]  # reference key -> seq of the message that created it


def resolve(households: list[Household], project: str) -> Resolved:
    identity = Identity()
    customers = _Customers()
    out = Resolved({}, set(), [], 0, customers.states, {})
    for h in households:
        for m in h.messages:
            changes = Changes()
            before = customers.next
            try:
                state = identity.resolve(project, m.body, customers, changes,
                                         lambda _s, _h: None)
            except LimitExceeded:
                out.refused.add(m.seq)
                continue
            for key in range(before, customers.next):
                out.created[key] = m.seq
            out.customer[m.seq] = state.key
            for merged in changes.deleted:
                out.merges.append((m.seq, merged, state.key))
            out.moves += changes.cookies_moved
    return out
