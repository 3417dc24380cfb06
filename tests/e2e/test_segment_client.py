"""A real Segment client, the relay and the simulator: what comes out at "Infinario"."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from .harness import PROJECT, Stack, eventually

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def events(stack: Stack, type_: str | None = None) -> list[dict[str, Any]]:
    return [e for e in stack.sim.events
            if e["project"] == PROJECT and (type_ is None or e["type"] == type_)]


class TestCalls:
    """Each Segment call produces exactly the Infinario commands the destination promises."""

    @pytest.mark.parametrize("gzip", [False, True])
    async def test_identify_track_page_screen(self, stack: Stack, gzip: bool) -> None:
        client = stack.client(gzip=gzip)
        await stack.run(client.identify, "user-1", {"name": "Ada", "address": {"city": "London",
                        "country": "UK"}, "a.b": 1}, anonymous_id="anon-1", timestamp=at(0))
        await stack.run(client.track, "user-1", "Signed Up",
                        {"plan": {"name": "pro"}, "^.^": "kitty", "currency": "$"},
                        context={"os": {"name": "iOS"}, "ip": "10.0.0.1"}, timestamp=at(1))
        await stack.run(client.page, "user-1", "Docs", "Home", {"url": "https://x.test/"},
                        timestamp=at(2))
        await stack.run(client.screen, "user-1", "App", "Settings", {}, timestamp=at(3))
        await stack.settle()
        assert client.errors == []

        customer = stack.sim.find_customer(PROJECT, registered="user-1")
        assert customer is not None
        assert "anon-1" in customer["ids"]["cookies"]
        props = customer["properties"]
        assert props["name"] == "Ada"
        assert props["address_city"] == "London" and props["address_country"] == "UK"
        assert props["a_b"] == 1

        (signed,) = events(stack, "Signed Up")
        assert signed["customer_ids"] == {"registered": "user-1"}
        assert signed["timestamp"] == pytest.approx(at(1).timestamp())
        assert signed["properties"]["plan_name"] == "pro"
        assert signed["properties"]["^_^"] == "kitty"
        assert signed["properties"]["currency"] == "$"
        assert signed["properties"]["os_name"] == "iOS"
        assert signed["properties"]["ip"] == "10.0.0.1"
        assert signed["properties"]["library_name"] == "analytics-python"

        types = [e["type"] for e in events(stack)]
        assert types == ["Signed Up", "session_start", "page_visit", "screen_visit"]
        (start,) = events(stack, "session_start")
        assert start["timestamp"] == pytest.approx(at(2).timestamp())
        assert start["properties"]["url"] == "https://x.test/"
        (page,) = events(stack, "page_visit")
        assert page["properties"]["name"] == "Home"
        assert page["properties"]["category"] == "Docs"
        (screen,) = events(stack, "screen_visit")
        assert screen["properties"]["name"] == "Settings"

    async def test_group_sets_group_properties_and_switching_clears(self, stack: Stack) -> None:
        client = stack.client()
        await stack.run(client.identify, "user-2", {"name": "Bob"}, timestamp=at(0))
        await stack.run(client.group, "user-2", "g1", {"name": "Acme", "plan": "gold",
                        "employees": 10}, timestamp=at(1))
        await stack.settle()
        props = stack.sim.find_customer(PROJECT, registered="user-2")["properties"]
        assert props["name"] == "Bob"
        assert props["group_id"] == "g1"
        assert props["group_name"] == "Acme" and props["group_plan"] == "gold"

        await stack.run(client.group, "user-2", "g2", {"name": "Beta"}, timestamp=at(2))
        await stack.settle()
        props = stack.sim.find_customer(PROJECT, registered="user-2")["properties"]
        assert props["group_id"] == "g2"
        assert props["group_name"] == "Beta"
        assert props["group_plan"] is None and props["group_employees"] is None
        assert props["name"] == "Bob"

    async def test_alias_merges_anonymous_history(self, stack: Stack) -> None:
        client = stack.client()
        await stack.run(client.track, event="Viewed", anonymous_id="anon-9", timestamp=at(0))
        await stack.run(client.identify, "user-9", {"email": "u9@x.test"}, timestamp=at(1))
        await stack.run(client.alias, "anon-9", "user-9", timestamp=at(2))
        await stack.settle()
        customer = stack.sim.find_customer(PROJECT, registered="user-9")
        assert customer is not None and "anon-9" in customer["ids"]["cookies"]
        assert stack.sim.find_customer(PROJECT, cookie="anon-9") == customer
        history = [e["type"] for e in stack.sim.events_of(PROJECT, registered="user-9")]
        assert history == ["Viewed"]
        directory = stack.router.partition
        assert directory.index[(PROJECT, "r:user-9")] == directory.index[(PROJECT, "c:anon-9")]

    async def test_call_with_both_ids_merges_two_customers(self, stack: Stack) -> None:
        client = stack.client()
        await stack.run(client.track, event="A", anonymous_id="anon-m", timestamp=at(0))
        await stack.run(client.track, "user-m", "B", timestamp=at(1))
        await stack.run(client.track, "user-m", "C", anonymous_id="anon-m", timestamp=at(2))
        await stack.settle()
        history = sorted(e["type"] for e in stack.sim.events_of(PROJECT, registered="user-m"))
        assert history == ["A", "B", "C"]
        directory = stack.router.partition
        assert directory.index[(PROJECT, "r:user-m")] == directory.index[(PROJECT, "c:anon-m")]


class TestSessions:
    """Page and screen calls open and close sessions on the calls' own time."""

    async def test_gap_longer_than_timeout_closes_and_reopens(self, stack: Stack) -> None:
        client = stack.client()
        for offset in (0, 60, 300):
            await stack.run(client.page, "user-s", None, "P", timestamp=at(offset))
        # 1200 s timeout: this one starts a new session.
        await stack.run(client.page, "user-s", None, "Q", timestamp=at(300 + 1201))
        await stack.settle()
        types = [e["type"] for e in events(stack)]
        assert types == ["session_start", "page_visit", "page_visit", "page_visit",
                         "session_end", "session_start", "page_visit"]
        (end,) = events(stack, "session_end")
        assert end["timestamp"] == pytest.approx(at(300).timestamp())
        assert end["properties"]["duration"] == pytest.approx(300)

    @pytest.mark.parametrize("stack_options", [{"session_timeout": 1.0}])
    async def test_live_session_closes_by_timer(self, stack: Stack) -> None:
        client = stack.client()
        await stack.run(client.page, "user-t", None, "P")
        await stack.run(client.screen, "user-t", None, "S")
        await stack.settle()
        assert events(stack, "session_end") == []
        await eventually(lambda: events(stack, "session_end"), within=10)
        (start,) = events(stack, "session_start")
        (end,) = events(stack, "session_end")
        (screen,) = events(stack, "screen_visit")
        assert end["timestamp"] == pytest.approx(screen["timestamp"])
        assert end["properties"]["duration"] == pytest.approx(
            screen["timestamp"] - start["timestamp"], abs=0.01)
