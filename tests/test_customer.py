"""One customer's turn: Segment messages in, Infinario commands and state changes out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from router.commands import Command
from router.customer import (
    CHANGES_STATE,
    SESSION_END,
    SESSION_START,
    CustomerState,
    TurnContext,
    call_ids,
    close_session,
    end_session,
    merge_into,
    state_decoder,
    state_encoder,
    turn,
)
from router.mapping import EventPolicy, LimitExceeded, Limits, Schema
from router.segment import validate

PROJECT = "proj"
TIMEOUT = 1200.0
# 2024-03-01T10:00:00Z: whole seconds keep the ISO round trip exact.
T0 = datetime(2024, 3, 1, 10, 0, 0, tzinfo=UTC).timestamp()

CONTEXT = {
    "ip": "10.0.0.1",
    "locale": "en-GB",
    "userAgent": "Mozilla/5.0",
    "os": {"name": "iOS", "version": "17.1"},
    "page": {"url": "https://shop.test/landing", "referrer": "https://search.test/?q=x"},
    "traits": {"email": "ctx@example.com"},
    "integrations": {"All": True},
}


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def msg(kind: str, at: float = T0, **fields: Any) -> dict[str, Any]:
    """A message exactly as the intake hands it on: validated, with an explicit timestamp."""
    message = {"type": kind, "timestamp": iso(at), **fields}
    return validate(message, type_=None, received_at=T0 + 10_000)


def ctx(
    *,
    policy: EventPolicy | None = None,
    limits: Limits | None = None,
    timeout: float = TIMEOUT,
) -> TurnContext:
    schema = Schema(limits) if limits is not None else Schema()
    return TurnContext(PROJECT, schema, policy or EventPolicy(), timeout)


def state(**fields: Any) -> CustomerState:
    return CustomerState(1, PROJECT, **fields)


def types(commands: list[Command]) -> list[str | None]:
    return [c.event_type if c.kind == "event" else "customer" for c in commands]


class TestCallIds:
    """userId maps to the registered id, anonymousId to the cookie, and alias carries both."""

    def test_user_and_anonymous(self) -> None:
        message = msg("identify", userId="u1", anonymousId="a1")
        assert call_ids(message) == {"registered": "u1", "cookie": "a1"}

    def test_anonymous_only(self) -> None:
        assert call_ids(msg("track", anonymousId="a1", event="X")) == {"cookie": "a1"}

    def test_numeric_user_id_is_a_string(self) -> None:
        assert call_ids(msg("track", userId=42, event="X")) == {"registered": "42"}

    def test_alias_uses_previous_id_as_cookie(self) -> None:
        message = msg("alias", userId="u1", previousId="a1", anonymousId="other")
        assert call_ids(message) == {"registered": "u1", "cookie": "a1"}


class TestIdentify:
    """identify updates the customer with its (flattened, sanitized) traits, else context.traits."""

    def test_traits_become_customer_properties(self) -> None:
        message = msg("identify", userId="u1", anonymousId="a1", context=CONTEXT,
                      traits={"email": "u1@example.com", "address": {"country": "UK"},
                              "a.b": 1})
        c = ctx()
        [command] = turn(state(), message, c)
        assert command == Command(
            "customer", PROJECT, {"registered": "u1", "cookie": "a1"},
            {"email": "u1@example.com", "address_country": "UK", "a_b": 1}, T0,
        )
        assert c.sanitized == 1

    def test_falls_back_to_context_traits(self) -> None:
        message = msg("identify", userId="u1", context={"traits": {"plan": "pro"}, "ip": "1.2.3.4"})
        [command] = turn(state(), message, ctx())
        assert command.properties == {"plan": "pro"}

    def test_own_traits_win_over_context_traits(self) -> None:
        message = msg("identify", userId="u1", traits={"plan": "free"},
                      context={"traits": {"plan": "pro", "email": "x@example.com"}})
        [command] = turn(state(), message, ctx())
        assert command.properties == {"plan": "free"}

    def test_customer_keys_over_the_limit_are_dropped(self) -> None:
        c = ctx(limits=Limits(customer_keys=2))
        turn(state(), msg("identify", userId="u1", traits={"a": 1, "b": 2}), c)
        [command] = turn(state(), msg("identify", userId="u1", traits={"b": 3, "c": 4}), c)
        assert command.properties == {"b": 3}
        assert c.dropped == 1


class TestTrack:
    """track emits one event of the (renamed) type with its properties plus context extras."""

    def test_properties_and_context_extras(self) -> None:
        message = msg("track", userId="u1", event="Clicked", context=CONTEXT,
                      properties={"button": "buy", "meta": {"x": 1}})
        s = state()
        [command] = turn(s, message, ctx())
        assert command.kind == "event"
        assert command.event_type == "Clicked"
        assert command.ids == {"registered": "u1"}
        assert command.timestamp == T0
        assert command.properties == {
            "ip": "10.0.0.1", "locale": "en-GB", "userAgent": "Mozilla/5.0",
            "os_name": "iOS", "os_version": "17.1",
            "page_url": "https://shop.test/landing", "page_referrer": "https://search.test/?q=x",
            "button": "buy", "meta_x": 1,
        }
        # track is not session activity
        assert s.session_start is None

    def test_own_property_wins_over_context_extra(self) -> None:
        message = msg("track", userId="u1", event="Clicked", context={"ip": "10.0.0.1"},
                      properties={"ip": "own"})
        [command] = turn(state(), message, ctx())
        assert command.properties == {"ip": "own"}

    def test_rename(self) -> None:
        policy = EventPolicy(renames={"Order Completed": "hard_purchase"})
        message = msg("track", userId="u1", event="Order Completed", properties={"total": 9.5})
        [command] = turn(state(), message, ctx(policy=policy))
        assert command.event_type == "hard_purchase"
        assert command.properties == {"total": 9.5}

    def test_campaign_is_refused(self) -> None:
        c = ctx()
        with pytest.raises(LimitExceeded) as caught:
            turn(state(), msg("track", userId="u1", event="campaign"), c)
        assert caught.value.code == "reserved_event_type"
        assert c.schema.report()["event_types"] == 0

    def test_campaign_allowed_by_configuration(self) -> None:
        c = ctx(policy=EventPolicy(allow_campaign=True))
        [command] = turn(state(), msg("track", userId="u1", event="campaign"), c)
        assert command.event_type == "campaign"

    def test_new_event_type_past_the_limit_is_refused(self) -> None:
        c = ctx(limits=Limits(event_types=1))
        turn(state(), msg("track", userId="u1", event="A"), c)
        with pytest.raises(LimitExceeded) as caught:
            turn(state(), msg("track", userId="u1", event="B"), c)
        assert caught.value.code == "event_type_limit"


class TestVisits:
    """page/screen emit visits; the first of a session adds session_start; an event-time gap
    longer than the timeout ends the old session at its last activity and starts a new one."""

    def test_first_page_starts_a_session_before_the_visit(self) -> None:
        s = state()
        message = msg("page", userId="u1", anonymousId="a1", name="Home", category="Shop",
                      context=CONTEXT, properties={"title": "Welcome"})
        start, visit = turn(s, message, ctx())
        extras = {
            "ip": "10.0.0.1", "locale": "en-GB", "userAgent": "Mozilla/5.0",
            "os_name": "iOS", "os_version": "17.1",
            "page_url": "https://shop.test/landing", "page_referrer": "https://search.test/?q=x",
        }
        ids = {"registered": "u1", "cookie": "a1"}
        assert start == Command(
            "event", PROJECT, ids,
            {**extras, "url": "https://shop.test/landing",
             "referrer": "https://search.test/?q=x"},
            T0, SESSION_START,
        )
        assert visit == Command(
            "event", PROJECT, ids,
            {**extras, "title": "Welcome", "name": "Home", "category": "Shop"},
            T0, "page_visit",
        )
        assert (s.session_start, s.session_last, s.session_ids) == (T0, T0, ids)

    def test_session_deadline_follows_the_wall_clock_of_the_last_activity(self) -> None:
        s = state()
        turn(s, msg("page", userId="u1"), ctx())
        assert s.deadline(TIMEOUT) == T0 + TIMEOUT  # no wall time given: event time
        c = TurnContext(PROJECT, Schema(), EventPolicy(), TIMEOUT, now=T0 + 5000)
        turn(s, msg("page", T0 + 60, userId="u1"), c)
        assert s.session_last == T0 + 60
        assert s.deadline(TIMEOUT) == T0 + 5000 + TIMEOUT

    def test_landing_url_from_the_page_properties(self) -> None:
        message = msg("page", anonymousId="a1",
                      properties={"url": "https://shop.test/p", "referrer": "https://ref.test"})
        start, _ = turn(state(), message, ctx())
        assert start.properties == {"url": "https://shop.test/p", "referrer": "https://ref.test"}

    def test_screen_visit(self) -> None:
        message = msg("screen", userId="u1", name="Settings", category="App",
                      context={"app": {"version": "2.0"}})
        start, visit = turn(state(), message, ctx())
        assert start.event_type == SESSION_START
        assert start.properties == {"app_version": "2.0"}
        assert visit.event_type == "screen_visit"
        assert visit.properties == {"app_version": "2.0", "name": "Settings", "category": "App"}

    def test_later_pages_in_the_session_are_visits_only(self) -> None:
        s = state()
        c = ctx()
        turn(s, msg("page", userId="u1"), c)
        commands = turn(s, msg("screen", T0 + TIMEOUT, userId="u1"), c)
        assert types(commands) == ["screen_visit"]
        assert (s.session_start, s.session_last) == (T0, T0 + TIMEOUT)

    def test_an_older_call_does_not_move_the_last_activity_back(self) -> None:
        s = state()
        c = ctx()
        turn(s, msg("page", T0 + 100, userId="u1"), c)
        assert types(turn(s, msg("page", T0 + 50, userId="u1"), c)) == ["page_visit"]
        assert (s.session_start, s.session_last) == (T0 + 100, T0 + 100)

    def test_gap_longer_than_the_timeout_ends_the_session_in_event_time(self) -> None:
        s = state()
        c = ctx()
        turn(s, msg("page", T0, anonymousId="a1"), c)
        turn(s, msg("page", T0 + 300, anonymousId="a1", userId="u1"), c)
        later = T0 + 300 + TIMEOUT + 1
        end, start, visit = turn(s, msg("page", later, userId="u1", context={"ip": "1.1.1.1"}), c)
        # session_end goes to the ids of the call that last touched the session
        assert end == Command("event", PROJECT, {"registered": "u1", "cookie": "a1"},
                              {"duration": 300.0}, T0 + 300, SESSION_END)
        assert start == Command("event", PROJECT, {"registered": "u1"}, {"ip": "1.1.1.1"},
                                later, SESSION_START)
        assert visit.event_type == "page_visit" and visit.timestamp == later
        assert (s.session_start, s.session_last) == (later, later)

    def test_refused_visit_leaves_the_session_alone(self) -> None:
        s = state(session_start=T0, session_last=T0, session_ids={"registered": "u1"})
        c = ctx(limits=Limits(event_types=0))
        with pytest.raises(LimitExceeded):
            turn(s, msg("page", T0 + 10 * TIMEOUT, userId="u1"), c)
        assert (s.session_start, s.session_last) == (T0, T0)

    def test_refused_session_start_leaves_no_session_open(self) -> None:
        # Room for page_visit but not for session_start: the message is refused
        # whole, so the state must not claim a session that was never started.
        s = state()
        c = ctx(limits=Limits(event_types=1))
        with pytest.raises(LimitExceeded):
            turn(s, msg("page", userId="u1"), c)
        assert (s.session_start, s.session_last, s.session_ids) == (None, None, None)

    def test_refused_session_end_leaves_the_session_open(self) -> None:
        c = ctx(limits=Limits(event_types=0))
        s = state(session_start=T0, session_last=T0 + 5, session_ids={"registered": "u1"})
        with pytest.raises(LimitExceeded):
            end_session(s, c)
        assert (s.session_start, s.session_last) == (T0, T0 + 5)
        close_session(s)
        assert (s.session_start, s.session_last, s.session_ids) == (None, None, None)

    def test_end_session(self) -> None:
        s = state(session_start=T0, session_last=T0 + 61.5,
                  session_ids={"cookie": "a1"}, registered="u1", cookies=["a1"])
        command = end_session(s, ctx())
        assert command == Command("event", PROJECT, {"cookie": "a1"}, {"duration": 61.5},
                                  T0 + 61.5, SESSION_END)
        assert (s.session_start, s.session_last, s.session_ids) == (None, None, None)
        assert s.deadline(TIMEOUT) is None


class TestGroup:
    """group sets group_id and group_-prefixed traits; a move nulls the old group's other keys."""

    def test_join(self) -> None:
        s = state()
        message = msg("group", userId="u1", groupId="g1",
                      traits={"name": "Acme", "plan": "pro", "address": {"city": "Oslo"}})
        [command] = turn(s, message, ctx())
        assert command == Command(
            "customer", PROJECT, {"registered": "u1"},
            {"group_id": "g1", "group_name": "Acme", "group_plan": "pro",
             "group_address_city": "Oslo"},
            T0,
        )
        assert s.group_id == "g1"
        assert sorted(s.group_keys) == ["group_address_city", "group_name", "group_plan"]

    def test_move_nulls_the_old_groups_keys_the_new_group_lacks(self) -> None:
        s = state()
        c = ctx()
        turn(s, msg("group", userId="u1", groupId="g1",
                    traits={"name": "Acme", "plan": "pro", "seats": 10}), c)
        [command] = turn(s, msg("group", T0 + 1, userId="u1", groupId="g2",
                                traits={"name": "Beta"}), c)
        assert command.properties == {"group_id": "g2", "group_name": "Beta",
                                      "group_plan": None, "group_seats": None}
        assert s.group_id == "g2"
        assert s.group_keys == ["group_name"]
        # Moving again only nulls what the current group set.
        [command] = turn(s, msg("group", T0 + 2, userId="u1", groupId="g3"), c)
        assert command.properties == {"group_id": "g3", "group_name": None}

    def test_same_group_keeps_every_key_it_set(self) -> None:
        s = state()
        c = ctx()
        turn(s, msg("group", userId="u1", groupId="g1", traits={"name": "Acme"}), c)
        [command] = turn(s, msg("group", userId="u1", groupId="g1", traits={"plan": "pro"}), c)
        # A partial update of the same group clears nothing...
        assert command.properties == {"group_id": "g1", "group_plan": "pro"}
        # ...and leaving it clears every key the group set, not just the last call's.
        [command] = turn(s, msg("group", userId="u1", groupId="g2"), c)
        assert command.properties == {"group_id": "g2", "group_name": None, "group_plan": None}


class TestAlias:
    """alias updates the customer identified by both ids, which makes Infinario merge them."""

    def test_customer_command_with_both_ids(self) -> None:
        s = state()
        [command] = turn(s, msg("alias", userId="u1", previousId="a1"), ctx())
        assert command == Command("customer", PROJECT, {"registered": "u1", "cookie": "a1"},
                                  {}, T0)
        assert s.session_start is None and s.group_id is None


class TestMergeInto:
    """A merge keeps every cookie, a group, and one session: earlier start, later last activity."""

    def test_sessions_combine(self) -> None:
        survivor = state(registered="u1", cookies=["a0"], session_start=T0 + 100,
                         session_last=T0 + 200, session_ids={"registered": "u1"})
        merged = CustomerState(2, PROJECT, cookies=["a1", "a0"], session_start=T0,
                               session_last=T0 + 500, session_ids={"cookie": "a1"},
                               group_id="g1", group_keys=["group_name"])
        merge_into(survivor, merged)
        assert survivor.registered == "u1"
        assert survivor.cookies == ["a0", "a1"]
        assert (survivor.session_start, survivor.session_last) == (T0, T0 + 500)
        assert survivor.session_ids == {"cookie": "a1"}
        assert (survivor.group_id, survivor.group_keys) == ("g1", ["group_name"])

    def test_survivor_keeps_its_later_activity_and_group(self) -> None:
        survivor = state(registered="u1", session_start=T0 + 100, session_last=T0 + 900,
                         session_ids={"registered": "u1"}, group_id="g1",
                         group_keys=["group_plan"])
        merged = CustomerState(2, PROJECT, cookies=["a1"], session_start=T0,
                               session_last=T0 + 50, session_ids={"cookie": "a1"},
                               group_id="g2", group_keys=["group_name"])
        merge_into(survivor, merged)
        assert (survivor.session_start, survivor.session_last) == (T0, T0 + 900)
        assert survivor.session_ids == {"registered": "u1"}
        assert (survivor.group_id, survivor.group_keys) == ("g1", ["group_plan"])

    def test_survivor_without_session_takes_the_merged_one(self) -> None:
        survivor = state(registered="u1")
        merged = CustomerState(2, PROJECT, cookies=["a1"], session_start=T0,
                               session_last=T0 + 5, session_ids={"cookie": "a1"})
        merge_into(survivor, merged)
        assert (survivor.session_start, survivor.session_last) == (T0, T0 + 5)
        assert survivor.session_ids == {"cookie": "a1"}

    def test_merged_without_session_changes_nothing(self) -> None:
        survivor = state(registered="u1", session_start=T0, session_last=T0 + 5)
        merge_into(survivor, CustomerState(2, PROJECT, cookies=["a1"]))
        assert (survivor.session_start, survivor.session_last) == (T0, T0 + 5)
        assert survivor.cookies == ["a1"]


class TestWhichTurnsChangeTheRecord:
    """The directory rewrites a customer's record only after the turns in CHANGES_STATE."""

    @pytest.mark.parametrize("message", [
        msg("track", userId="u1", anonymousId="a1", event="Clicked",
            properties={"a": {"b": 1}}, context=CONTEXT),
        msg("identify", userId="u1", anonymousId="a1", traits={"email": "x@example.com"}),
        msg("alias", userId="u1", previousId="a1"),
    ], ids=["track", "identify", "alias"])
    def test_other_turns_leave_the_record_as_it_was(self, message: dict[str, Any]) -> None:
        assert message["type"] not in CHANGES_STATE
        before = state(registered="u1", cookies=["a1"], group_id="g1", group_keys=["group_x"],
                       session_start=T0 - 60, session_last=T0 - 30,
                       session_ids={"registered": "u1"}, session_seen=T0 - 30)
        after = state_decoder.decode(state_encoder.encode(before))  # a deep copy
        turn(after, message, ctx())
        assert after == before

    @pytest.mark.parametrize("message", [
        msg("page", userId="u1", name="Home"),
        msg("screen", userId="u1", name="Home"),
        msg("group", userId="u1", groupId="g2", traits={"plan": "pro"}),
    ], ids=["page", "screen", "group"])
    def test_session_and_group_turns_change_it(self, message: dict[str, Any]) -> None:
        assert message["type"] in CHANGES_STATE
        before = state(registered="u1")
        after = state(registered="u1")
        turn(after, message, ctx())
        assert after != before
