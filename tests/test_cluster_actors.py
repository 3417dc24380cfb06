"""A partition's customers in the Redis Streams mode, on hand-made stream entries."""

from __future__ import annotations

import json
from typing import Any

from router.cluster.actors import Entry, PartitionActors, Round
from router.commands import Command, decode_command, encode_command
from router.customer import CustomerState, state_decoder, state_encoder
from router.mapping import EventPolicy, Limits, Schema

NOW = 1_800_000_000.0


def actors() -> PartitionActors:
    return PartitionActors(project="proj", schema=Schema(Limits()), policy=EventPolicy(),
                           session_timeout=1800, encode=encode_command)


_ids = iter(range(1, 10**6))


def entry(key: int, control: str | None = None, **fields: Any) -> Entry:
    raw = {"k": str(key), **({"c": control} if control else {})}
    raw.update({name: value if isinstance(value, bytes) else str(value)
                for name, value in fields.items()})
    return Entry.parse(f"1-{next(_ids)}", raw)


def track(key: int, event: str, user: str | None = None, anon: str | None = None,
          **fields: Any) -> Entry:
    message = {"type": "track", "event": event, "messageId": event,
               "timestamp": "2026-11-30T00:00:00Z", "_time": NOW - 60}
    if user:
        message["userId"] = user
    if anon:
        message["anonymousId"] = anon
    return entry(key, b=json.dumps(message).encode(), w="wk", **fields)


def events(round_: Round) -> list[tuple[int, str, str]]:
    out = []
    for customer, _, wire in round_.commands:
        command = decode_command(wire)
        out.append((customer, command.event_type or command.kind,
                    json.dumps(command.ids, sort_keys=True)))
    return out


def test_a_message_replays_its_id_changes_before_its_turn() -> None:
    a = actors()
    r = Round()
    a.apply(track(7, "Signed Up", "u1", "c1", r="u1", a="c1"), r, NOW)
    state = a.states[7]
    assert (state.registered, state.cookies) == ("u1", ["c1"])
    assert events(r) == [(7, "Signed Up", '{"cookie": "c1", "registered": "u1"}')]
    assert r.dirty[7] is state and len(r.acked) == 1


def test_the_survivor_waits_for_the_merged_state_then_runs_in_order() -> None:
    survivor, merged = actors(), actors()  # two partitions
    r1, r2 = Round(), Round()
    merged.apply(track(3, "anon browse", None, "c9", a="c9"), r2, NOW)
    survivor.apply(track(4, "first", "u1", r="u1"), r1, NOW)
    merging = track(4, "merging", "u1", "c9", m=3)
    later = track(4, "later", "u1")
    survivor.apply(merging, r1, NOW)
    survivor.apply(later, r1, NOW)
    assert events(r1) == [(4, "first", '{"registered": "u1"}')]
    assert merging.id not in r1.acked and later.id not in r1.acked
    assert survivor.held() == 2

    merged.apply(entry(3, "handoff", v=4), r2, NOW)
    assert 3 in r2.deleted and 3 not in merged.states
    (target, key, blob), = r2.absorbs
    assert (target, key) == (4, 3) and state_decoder.decode(blob).cookies == ["c9"]

    absorb = entry(4, "absorb", v=3, s=blob)
    survivor.apply(absorb, r1, NOW)
    assert [e[1] for e in events(r1)] == ["first", "merging", "later"]
    assert survivor.states[4].cookies == ["c9"]
    assert r1.acked[-3:] == [absorb.id, merging.id, later.id]
    assert survivor.held() == 0


def test_an_absorb_that_comes_first_waits_for_the_merging_message() -> None:
    a = actors()
    r = Round()
    state = CustomerState(5, "proj", cookies=["c5"])
    absorb = entry(6, "absorb", v=5, s=state_encoder.encode(state))
    a.apply(absorb, r, NOW)
    assert absorb.id not in r.acked and a.held() == 1
    a.apply(track(6, "merging", m=5, r="u6"), r, NOW)
    assert a.states[6].cookies == ["c5"] and absorb.id in r.acked and a.held() == 0


def test_a_dropped_cookie_leaves_the_old_owner_in_order() -> None:
    a = actors()
    r = Round()
    a.apply(track(1, "x", r="u1", a="shared"), r, NOW)
    a.apply(entry(1, "drop", v="shared"), r, NOW)
    assert a.states[1].cookies == []
    assert a.states[1].ids() == {"registered": "u1"}


def test_trimmed_cookies_are_the_oldest() -> None:
    a = actors()
    r = Round()
    a.apply(track(1, "x", a="c1"), r, NOW)
    a.apply(track(1, "y", a="c2"), r, NOW)
    a.apply(track(1, "z", a="c3", t=2), r, NOW)
    assert a.states[1].cookies == ["c3"]


def test_a_refused_message_is_acknowledged_as_a_dead_letter() -> None:
    a = PartitionActors(project="proj", schema=Schema(Limits(event_types=1)),
                        policy=EventPolicy(), session_timeout=1800,
                        encode=encode_command)
    r = Round()
    a.apply(track(1, "one", a="c1"), r, NOW)
    refused = track(1, "two")
    a.apply(refused, r, NOW)
    assert refused.id in r.acked
    assert [(key, code) for key, _, code, _ in r.refused] == [(1, "event_type_limit")]


def test_a_replayed_dead_letter_becomes_a_command_in_order() -> None:
    a = actors()
    r = Round()
    command = encode_command(Command("event", "proj", {"registered": "u1"}, {"x": 1}, NOW,
                                     "replayed"))
    replay = entry(1, "replay", command=command)
    a.apply(replay, r, NOW)
    assert events(r) == [(1, "replayed", '{"registered": "u1"}')] and r.acked == [replay.id]
