"""The built-in Infinario simulator: both dialects, merges, faults, counting and serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from trio.testing import MockClock

import router.simulator as simulator_module
from router.server import Request, RequestHead
from router.simulator import Simulator, main, run_simulator

PROJECT = "proj"
V2_PATH = f"/track/v2/projects/{PROJECT}/batch"
TOKEN = "Token secret"


class Reply(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: Any


async def call(
    app: Simulator,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    query: str = "",
    raw: bytes | None = None,
) -> Reply:
    """One HTTP request through the simulator's handler in-process, as the server makes it."""
    payload = raw if raw is not None else b"" if body is None else msgspec.json.encode(body)
    head = RequestHead(method, path, query,
                       {k.lower().encode(): v.encode() for k, v in (headers or {}).items()},
                       "1.1")
    route = app.route(head)
    assert len(payload) <= route.limit
    response = await route.call(Request(head, payload, trio.current_time()))
    assert response.content_type == b"application/json"
    reply_headers = {k.decode(): v.decode() for k, v in response.headers}
    return Reply(response.status, reply_headers, msgspec.json.decode(response.body))


def event(ids: dict[str, str], event_type: str = "page", *, project: str = PROJECT,
          timestamp: float = 1.0, props: dict[str, Any] | None = None,
          **properties: Any) -> dict[str, Any]:
    return {"name": "crm/events", "data": {
        "customer_ids": ids, "project_id": project, "type": event_type,
        "properties": {**(props or {}), **properties}, "timestamp": timestamp}}


def update(ids: dict[str, str], *, project: str = PROJECT, props: dict[str, Any] | None = None,
           **properties: Any) -> dict[str, Any]:
    return {"name": "crm/customers", "data": {
        "ids": ids, "project_id": project, "properties": {**(props or {}), **properties}}}


def v2_event(ids: dict[str, str], event_type: str = "page", *, timestamp: float = 1.0,
             props: dict[str, Any] | None = None, **properties: Any) -> dict[str, Any]:
    return {"name": "customers/events", "data": {
        "customer_ids": ids, "event_type": event_type, "timestamp": timestamp,
        "properties": {**(props or {}), **properties}}}


def v2_update(ids: dict[str, str], stamp: float | None, **properties: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"customer_ids": ids, "properties": properties}
    if stamp is not None:
        data["update_timestamp"] = stamp
    return {"name": "customers", "data": data}


async def bulk(sim: Simulator, *commands: dict[str, Any]) -> Reply:
    return await call(sim, "POST", "/bulk", {"commands": list(commands)})


async def batch(sim: Simulator, *commands: dict[str, Any], auth: str | None = TOKEN,
                path: str = V2_PATH) -> Reply:
    headers = {"Authorization": auth} if auth is not None else {}
    return await call(sim, "POST", path, {"commands": list(commands)}, headers=headers)


def only_error(reply: Reply) -> str:
    """The single error message of a one-command legacy answer."""
    assert reply.status == 200, reply.body
    [result] = reply.body["results"]
    assert result["status"] == "error"
    [message] = result["errors"]
    return str(message)


class TestLegacyResults:
    """Legacy /bulk answers one result per command, in order, and applies only valid ones."""

    async def test_ok_and_error_by_position(self) -> None:
        sim = Simulator()
        reply = await bulk(sim, event({"registered": "u1"}, "first"),
                           {"name": "crm/nonsense", "data": {}},
                           event({"cookie": "c1"}, "second", timestamp=2.5, price=3),
                           update({"registered": "u1"}, name="Ada"))
        assert reply.status == 200
        assert reply.body["success"] is True
        results = reply.body["results"]
        assert [r["status"] for r in results] == ["ok", "error", "ok", "ok"]
        assert "unknown command 'crm/nonsense'" in results[1]["errors"][0]
        assert [(e["type"], e["customer_ids"], e["properties"], e["timestamp"])
                for e in sim.events] == [
            ("first", {"registered": "u1"}, {}, 1.0),
            ("second", {"cookie": "c1"}, {"price": 3}, 2.5)]
        customer = sim.find_customer(PROJECT, registered="u1")
        assert customer is not None
        assert customer["properties"] == {"name": "Ada"}
        assert sim.requests == [{"path": "/bulk", "dialect": "legacy", "commands": 4,
                                 "status": 200}]

    async def test_customers_take_ids_not_customer_ids(self) -> None:
        sim = Simulator()
        wrong = {"name": "crm/customers", "data": {
            "customer_ids": {"registered": "u1"}, "project_id": PROJECT, "properties": {"a": 1}}}
        assert only_error(await bulk(sim, wrong)) == "crm/customers takes ids, not customer_ids"
        assert sim.customers(PROJECT) == []

    async def test_events_take_customer_ids_not_ids(self) -> None:
        sim = Simulator()
        wrong = event({"registered": "u1"})
        wrong["data"]["ids"] = wrong["data"].pop("customer_ids")
        assert only_error(await bulk(sim, wrong)) == "crm/events takes customer_ids, not ids"
        assert sim.events == []

    @pytest.mark.parametrize("key", ["a.b", "$set", "price$"])
    async def test_key_with_dot_or_dollar_is_an_error_naming_it(self, key: str) -> None:
        sim = Simulator()
        message = only_error(await bulk(sim, event({"registered": "u1"}, props={key: 1})))
        assert repr(key) in message
        assert only_error(await bulk(sim, update({"registered": "u1"}, props={key: 1})))
        assert sim.events == [] and sim.customers(PROJECT) == []

    async def test_nested_keys_are_values_not_checked(self) -> None:
        sim = Simulator()
        reply = await bulk(sim, event({"registered": "u1"}, cart={"a.b": 1}))
        assert reply.body["results"] == [{"status": "ok"}]

    @pytest.mark.parametrize(("ids", "expected"), [
        ({}, "customer_ids must be an object with a registered and/or cookie id"),
        ({"registered": ""}, "customer_ids.registered must be a non-empty string"),
        ({"cookie": 7}, "customer_ids.cookie must be a non-empty string"),
        ({"email": "a@b"}, "customer_ids has unknown id 'email'; use registered and/or cookie"),
    ])
    async def test_bad_ids_are_errors(self, ids: dict[str, Any], expected: str) -> None:
        assert only_error(await bulk(Simulator(), event(ids))) == expected

    @pytest.mark.parametrize(("field", "value", "expected"), [
        ("customer_ids", None, "customer_ids is missing"),
        ("project_id", None, "project_id is missing"),
        ("project_id", "", "project_id must be a non-empty string"),
        ("type", None, "type is missing"),
        ("timestamp", "yesterday", "timestamp must be a number of seconds"),
        ("timestamp", True, "timestamp must be a number of seconds"),
        ("properties", [], "properties must be an object"),
    ])
    async def test_bad_event_fields_are_errors(self, field: str, value: Any,
                                               expected: str) -> None:
        command = event({"registered": "u1"})
        if value is None:
            del command["data"][field]
        else:
            command["data"][field] = value
        sim = Simulator()
        assert only_error(await bulk(sim, command)) == expected
        assert sim.stats()["errors"] == 1

    async def test_more_than_max_commands_is_400(self) -> None:
        sim = Simulator()
        assert (await bulk(sim, *[event({"cookie": f"c{i}"}) for i in range(50)])).status == 200
        reply = await bulk(sim, *[event({"cookie": f"c{i}"}) for i in range(51)])
        assert reply.status == 400
        assert reply.body == {"success": False, "errors": [
            "51 commands in one request; send at most 50"]}
        assert len(sim.events) == 50

    async def test_max_commands_is_configurable(self) -> None:
        sim = Simulator(max_commands=2)
        assert (await bulk(sim, *[event({"cookie": "c"})] * 3)).status == 400

    @pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"commands": {}}', b"{}"])
    async def test_malformed_body_is_400(self, raw: bytes) -> None:
        sim = Simulator()
        reply = await call(sim, "POST", "/bulk", raw=raw)
        assert reply.status == 400
        assert reply.body["success"] is False and reply.body["errors"]
        assert sim.stats()["by_status"] == {"400": 1}


class TestV2:
    """The v2 batch API checks credentials, takes its project from the path and answers
    success by position."""

    async def test_shapes_and_results_by_position(self) -> None:
        sim = Simulator()
        reply = await batch(sim, v2_event({"registered": "u1"}, "purchase", timestamp=5.0, n=1),
                            v2_update({"registered": "u1"}, 10.0, name="Ada"),
                            event({"registered": "u1"}))
        assert reply.status == 200
        assert reply.body["success"] is True
        ok, updated, legacy = reply.body["results"]
        assert ok == updated == {"success": True}
        assert legacy["success"] is False
        assert "unknown command 'crm/events'" in legacy["errors"][0]
        assert sim.events == [{"project": PROJECT, "customer_ids": {"registered": "u1"},
                               "type": "purchase", "properties": {"n": 1}, "timestamp": 5.0,
                               "customer": sim.events[0]["customer"]}]
        assert sim.customers(PROJECT)[0]["properties"] == {"name": "Ada"}
        assert sim.requests[0]["dialect"] == "v2"

    async def test_update_timestamp_is_required(self) -> None:
        sim = Simulator()
        reply = await batch(sim, v2_update({"registered": "u1"}, None, name="Ada"))
        assert reply.body["results"] == [
            {"success": False, "errors": ["update_timestamp is missing"]}]
        assert sim.customers(PROJECT) == []

    async def test_key_with_dollar_is_an_error(self) -> None:
        reply = await batch(Simulator(), v2_event({"cookie": "c"}, props={"$x": 1}))
        assert reply.body["results"][0]["success"] is False
        assert "'$x'" in reply.body["results"][0]["errors"][0]

    @pytest.mark.parametrize("auth", [None, "Bearer x", "token lowercase"])
    async def test_missing_or_foreign_scheme_cannot_authenticate(self, auth: str | None) -> None:
        sim = Simulator()
        reply = await batch(sim, v2_event({"cookie": "c"}), auth=auth)
        assert reply.status == 400
        assert reply.body == {"success": False, "errors": ["Could not authenticate"]}
        assert sim.events == []

    async def test_any_token_or_basic_header_passes_without_configured_auth(self) -> None:
        sim = Simulator()
        for auth in ("Token abc", "Basic aWQ6c2VjcmV0"):
            assert (await batch(sim, v2_event({"cookie": "c"}), auth=auth)).status == 200
        assert len(sim.events) == 2

    async def test_configured_auth_is_exact_per_project(self) -> None:
        sim = Simulator(v2_auth={PROJECT: "Basic aWQ6c2VjcmV0", "other": "Token o"})
        assert (await batch(sim, v2_event({"cookie": "c"}), auth="Basic aWQ6c2VjcmV0")
                ).status == 200
        for auth, path in [("Token o", V2_PATH), ("Basic aWQ6c2VjcmV0",
                                                    "/track/v2/projects/other/batch"),
                           ("Token x", "/track/v2/projects/unknown/batch")]:
            reply = await batch(sim, v2_event({"cookie": "c"}), auth=auth, path=path)
            assert reply.status == 400
            assert reply.body["errors"] == ["Could not authenticate"]
        assert len(sim.events) == 1

    async def test_project_is_the_token_in_the_path(self) -> None:
        sim = Simulator()
        await batch(sim, v2_event({"cookie": "c"}), path="/track/v2/projects/other/batch")
        assert sim.events[0]["project"] == "other"
        assert sim.find_customer("other", cookie="c") is not None
        assert sim.find_customer(PROJECT, cookie="c") is None

    async def test_more_than_max_commands_is_400(self) -> None:
        reply = await batch(Simulator(), *[v2_event({"cookie": "c"})] * 51)
        assert reply.status == 400
        assert reply.body["success"] is False


class TestUpdateTimestamp:
    """v2 updates never let an older update_timestamp overwrite a key a newer one set;
    legacy updates apply in order."""

    async def test_older_update_loses_only_the_keys_set_by_newer(self) -> None:
        sim = Simulator()
        reply = await batch(sim, v2_update({"registered": "u1"}, 20.0, plan="pro"),
                            v2_update({"registered": "u1"}, 10.0, plan="free", city="Oslo"))
        assert reply.body["results"] == [{"success": True}] * 2
        customer = sim.find_customer(PROJECT, registered="u1")
        assert customer is not None
        assert customer["properties"] == {"plan": "pro", "city": "Oslo"}
        await batch(sim, v2_update({"registered": "u1"}, 30.0, plan="team"))
        customer = sim.find_customer(PROJECT, registered="u1")
        assert customer is not None
        assert customer["properties"]["plan"] == "team"

    async def test_equal_timestamps_apply_in_arrival_order(self) -> None:
        sim = Simulator()
        await batch(sim, v2_update({"registered": "u1"}, 5.0, plan="a"),
                    v2_update({"registered": "u1"}, 5.0, plan="b"))
        assert sim.customers(PROJECT)[0]["properties"] == {"plan": "b"}

    async def test_legacy_updates_apply_in_order(self) -> None:
        sim = Simulator()
        await bulk(sim, update({"registered": "u1"}, plan="pro"),
                   update({"registered": "u1"}, plan="free"))
        assert sim.customers(PROJECT)[0]["properties"] == {"plan": "free"}

    async def test_a_merged_key_keeps_its_timestamp(self) -> None:
        sim = Simulator()
        await batch(sim, v2_update({"cookie": "c1"}, 20.0, plan="pro"),
                    v2_update({"registered": "u1"}, 1.0, name="Ada"),
                    v2_update({"registered": "u1", "cookie": "c1"}, 2.0),
                    v2_update({"registered": "u1"}, 10.0, plan="free"))
        customer = sim.find_customer(PROJECT, registered="u1")
        assert customer is not None
        assert customer["properties"] == {"name": "Ada", "plan": "pro"}


class TestMerges:
    """Customers join, merge and hand devices over the way Infinario resolves ids."""

    async def test_cookie_joins_the_registered_customer(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"registered": "u1"}, "a"),
                   event({"registered": "u1", "cookie": "c1"}, "b"),
                   event({"cookie": "c1"}, "c"))
        [customer] = sim.customers(PROJECT)
        assert customer["ids"] == {"registered": "u1", "cookies": ["c1"]}
        assert [e["type"] for e in sim.events_of(PROJECT, cookie="c1")] == ["a", "b", "c"]
        assert len({e["customer"] for e in sim.events}) == 1

    async def test_anonymous_customer_takes_a_registered_id(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"cookie": "c1"}, "anon"),
                   update({"registered": "u1", "cookie": "c1"}, name="Ada"))
        [customer] = sim.customers(PROJECT)
        assert customer["ids"] == {"registered": "u1", "cookies": ["c1"]}
        assert customer["properties"] == {"name": "Ada"}
        assert [e["type"] for e in sim.events_of(PROJECT, registered="u1")] == ["anon"]

    async def test_two_customers_merge_and_the_registered_one_wins(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"cookie": "c1"}, "anon-1", timestamp=1.0),
                   update({"cookie": "c1"}, plan="free", city="Oslo"),
                   event({"cookie": "c2"}, "other"),
                   event({"registered": "u1"}, "known", timestamp=2.0),
                   update({"registered": "u1"}, plan="pro"),
                   event({"cookie": "c1"}, "anon-2", timestamp=3.0))
        anonymous = sim.find_customer(PROJECT, cookie="c1")
        known = sim.find_customer(PROJECT, registered="u1")
        assert anonymous is not None and known is not None
        assert anonymous["customer"] != known["customer"]

        await bulk(sim, update({"registered": "u1", "cookie": "c1"}))
        merged = sim.find_customer(PROJECT, cookie="c1")
        assert merged == sim.find_customer(PROJECT, registered="u1")
        assert merged is not None
        assert merged["customer"] == known["customer"]
        assert merged["ids"] == {"registered": "u1", "cookies": ["c1"]}
        assert merged["properties"] == {"plan": "pro", "city": "Oslo"}
        assert len(sim.customers(PROJECT)) == 2
        # Arrival order across both histories, and each event re-pointed.
        history = sim.events_of(PROJECT, registered="u1")
        assert [e["type"] for e in history] == ["anon-1", "known", "anon-2"]
        assert {e["customer"] for e in history} == {known["customer"]}
        # Events keep the ids they were sent with.
        assert history[0]["customer_ids"] == {"cookie": "c1"}
        assert [e["type"] for e in sim.events_of(PROJECT, cookie="c2")] == ["other"]

    async def test_shared_device_moves_the_cookie_without_merging(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"registered": "alice", "cookie": "tablet"}, "alice-1"),
                   update({"registered": "alice"}, name="Alice"),
                   event({"registered": "bob"}, "bob-1"),
                   event({"registered": "bob", "cookie": "tablet"}, "bob-2"))
        alice = sim.find_customer(PROJECT, registered="alice")
        bob = sim.find_customer(PROJECT, registered="bob")
        assert alice is not None and bob is not None
        assert alice["ids"] == {"registered": "alice", "cookies": []}
        assert bob["ids"] == {"registered": "bob", "cookies": ["tablet"]}
        assert bob["properties"] == {}
        assert sim.find_customer(PROJECT, cookie="tablet") == bob
        assert [e["type"] for e in sim.events_of(PROJECT, registered="alice")] == ["alice-1"]
        assert [e["type"] for e in sim.events_of(PROJECT, registered="bob")] == [
            "bob-1", "bob-2"]

    async def test_new_registered_id_on_a_claimed_cookie_is_a_new_customer(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"registered": "alice", "cookie": "tablet"}),
                   event({"registered": "carol", "cookie": "tablet"}, "carol-1"))
        carol = sim.find_customer(PROJECT, registered="carol")
        alice = sim.find_customer(PROJECT, registered="alice")
        assert carol is not None and alice is not None
        assert carol["customer"] != alice["customer"]
        assert carol["ids"]["cookies"] == ["tablet"] and alice["ids"]["cookies"] == []

    async def test_projects_are_separate(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"registered": "u1"}), event({"registered": "u1"}, project="p2"))
        one, two = sim.find_customer(PROJECT, registered="u1"), sim.find_customer(
            "p2", registered="u1")
        assert one is not None and two is not None and one["customer"] != two["customer"]
        assert sim.find_customer("nowhere", cookie="x") is None
        assert sim.events_of("nowhere", registered="u1") == []


class TestRequestFaults:
    """fail_requests answers whole requests with a status, drops their data, then recovers."""

    async def test_counted_failures_with_retry_after(self) -> None:
        sim = Simulator()
        sim.fail_requests(503, count=2, retry_after=1.5)
        for _ in range(2):
            reply = await bulk(sim, event({"cookie": "c"}))
            assert reply.status == 503
            assert reply.headers["retry-after"] == "1.5"
            assert reply.body == {"success": False, "errors": ["simulated failure"]}
        assert sim.events == []
        assert (await bulk(sim, event({"cookie": "c"}))).status == 200
        assert len(sim.events) == 1
        assert sim.stats()["by_status"] == {"200": 1, "503": 2}
        assert [r["commands"] for r in sim.requests] == [1, 1, 1]

    async def test_uncounted_failures_last_until_cleared(self) -> None:
        sim = Simulator()
        sim.fail_requests(500)
        for _ in range(5):
            reply = await batch(sim, v2_event({"cookie": "c"}))
            assert reply.status == 500
            assert "retry-after" not in reply.headers
        sim.clear_faults()
        assert (await batch(sim, v2_event({"cookie": "c"}))).status == 200

    async def test_zero_count_fails_nothing(self) -> None:
        sim = Simulator()
        sim.fail_requests(500, count=0)
        assert (await bulk(sim, event({"cookie": "c"}))).status == 200

    @pytest.mark.parametrize(("status", "count", "retry_after"),
                             [(99, None, None), (600, 1, None), (500, -1, None), (500, 1, -2.0)])
    def test_bad_arguments_are_refused(self, status: int, count: int | None,
                                       retry_after: float | None) -> None:
        with pytest.raises(ValueError, match="must be"):
            Simulator().fail_requests(status, count, retry_after)


class TestCommandFaults:
    """fail_commands answers the next commands retry or error instead of applying them."""

    async def test_legacy_retry_then_ok(self) -> None:
        sim = Simulator()
        sim.fail_commands("retry", 3)
        first = await bulk(sim, event({"cookie": "c"}, "a"), event({"cookie": "c"}, "b"))
        second = await bulk(sim, event({"cookie": "c"}, "c"), event({"cookie": "c"}, "d"))
        assert first.body["results"] == [{"status": "retry"}] * 2
        assert second.body["results"] == [{"status": "retry"}, {"status": "ok"}]
        assert [e["type"] for e in sim.events] == ["d"]
        stats = sim.stats()
        assert (stats["commands"], stats["retries"], stats["errors"]) == (4, 3, 0)

    async def test_legacy_error(self) -> None:
        sim = Simulator()
        sim.fail_commands("error", 1)
        reply = await bulk(sim, update({"cookie": "c"}, a=1), update({"cookie": "c"}, b=2))
        assert reply.body["results"] == [
            {"status": "error", "errors": ["simulated error"]}, {"status": "ok"}]
        assert sim.customers(PROJECT)[0]["properties"] == {"b": 2}

    @pytest.mark.parametrize("status", ["retry", "error"])
    async def test_v2_has_only_failure(self, status: str) -> None:
        sim = Simulator()
        sim.fail_commands(status, 1)
        reply = await batch(sim, v2_event({"cookie": "c"}), v2_event({"cookie": "c"}))
        first, second = reply.body["results"]
        assert first["success"] is False and first["errors"]
        assert second == {"success": True}
        assert len(sim.events) == 1

    def test_unknown_status_is_refused(self) -> None:
        with pytest.raises(ValueError, match="'retry' or 'error'"):
            Simulator().fail_commands("ok", 1)


class TestTruncation:
    """truncate_results drops the tail of the next answer, and those commands are not applied."""

    async def test_tail_missing_once(self) -> None:
        sim = Simulator()
        sim.truncate_results(2)
        reply = await bulk(sim, *[event({"cookie": "c"}, f"e{i}") for i in range(3)])
        assert reply.body["results"] == [{"status": "ok"}]
        assert [e["type"] for e in sim.events] == ["e0"]
        assert sim.stats()["commands"] == 1
        reply = await bulk(sim, *[event({"cookie": "c"}, f"e{i}") for i in (1, 2)])
        assert reply.body["results"] == [{"status": "ok"}] * 2

    async def test_truncating_more_than_sent_leaves_nothing(self) -> None:
        sim = Simulator()
        sim.truncate_results(5)
        reply = await batch(sim, v2_event({"cookie": "c"}))
        assert reply.body == {"success": True, "results": []}
        assert sim.events == []


class TestDelay:
    """set_delay makes every tracking answer wait, and control endpoints stay prompt."""

    async def test_answers_wait(self, autojump_clock: MockClock) -> None:
        sim = Simulator()
        sim.set_delay(2.5)
        start = trio.current_time()
        assert (await bulk(sim, event({"cookie": "c"}))).status == 200
        assert trio.current_time() - start == pytest.approx(2.5)
        start = trio.current_time()
        assert (await call(sim, "GET", "/_sim/stats")).status == 200
        assert trio.current_time() == start


class TestFaultsOverHttp:
    """POST /_sim/faults sets the same faults, all or nothing; DELETE and reset clear them."""

    async def test_examples_from_the_documentation(self) -> None:
        sim = Simulator()
        for spec in ({"fail_requests": {"status": 500, "count": 3, "retry_after": 1}},
                     {"fail_commands": {"status": "retry", "count": 2}},
                     {"truncate_results": 1}, {"delay": 0.05}):
            reply = await call(sim, "POST", "/_sim/faults", spec)
            assert reply.status == 200, reply.body
        faults = (await call(sim, "GET", "/_sim/faults")).body
        assert faults == {"request_status": 500, "request_count": 3, "retry_after": 1.0,
                          "command_status": "retry", "command_count": 2, "truncate": 1,
                          "delay": 0.05}
        reply = await bulk(sim, event({"cookie": "c"}))
        assert reply.status == 500
        assert reply.headers["retry-after"] == "1"
        assert (await call(sim, "DELETE", "/_sim/faults")).status == 200
        assert (await bulk(sim, event({"cookie": "c"}))).body["results"] == [{"status": "ok"}]

    @pytest.mark.parametrize(("spec", "message"), [
        ([], "faults must be a non-empty JSON object"),
        ({"explode": 1}, "unknown fault 'explode'"),
        ({"fail_requests": {"status": 500, "cnt": 3}}, "unknown field 'cnt'"),
        ({"fail_requests": {"status": "500"}}, "fail_requests.status must be an integer"),
        ({"fail_commands": {"status": "later", "count": 1}}, "'retry' or 'error'"),
        ({"delay": 0.1, "truncate_results": -1}, "truncate_results must be 0 or more"),
    ])
    async def test_bad_spec_is_400_and_changes_nothing(self, spec: Any, message: str) -> None:
        sim = Simulator()
        reply = await call(sim, "POST", "/_sim/faults", spec)
        assert reply.status == 400
        assert message in reply.body["errors"][0]
        assert (await call(sim, "GET", "/_sim/faults")).body["delay"] == 0.0

    async def test_reset_clears_records_and_faults(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"cookie": "c"}))
        sim.fail_requests(500)
        assert (await call(sim, "POST", "/_sim/reset")).body == {"success": True}
        assert sim.events == [] and sim.customers(PROJECT) == [] and sim.requests == []
        assert sim.stats()["requests"] == 0
        assert (await bulk(sim, event({"cookie": "c"}))).status == 200


class TestCounting:
    """record=False validates and counts but keeps no events, customers or request records."""

    async def test_counts_without_records(self) -> None:
        sim = Simulator(record=False)
        reply = await bulk(sim, event({"cookie": "c"}, "page"), event({"cookie": "c"}, "page"),
                           event({"cookie": "c"}, "buy"), update({"cookie": "c"}, a=1),
                           event({"cookie": "c"}, "bad", props={"a.b": 1}))
        assert [r["status"] for r in reply.body["results"]] == ["ok"] * 4 + ["error"]
        await batch(sim, v2_event({"registered": "u"}, "page"),
                    v2_update({"registered": "u"}, 1.0, b=2))
        assert sim.events == [] and sim.requests == [] and sim.customers(PROJECT) == []
        stats = sim.stats()
        assert {k: stats[k] for k in ("requests", "commands", "events", "customer_updates",
                                      "errors", "customers", "record")} == {
            "requests": 2, "commands": 7, "events": 4, "customer_updates": 2, "errors": 1,
            "customers": 0, "record": False}
        assert stats["by_status"] == {"200": 2}
        assert stats["events_by_type"] == {"page": 3, "buy": 1}


class TestRateLimit:
    """Past the per-minute limit both dialects get 429 with Retry-After and the data is dropped,
    until the sliding window moves on."""

    async def test_limit_and_sliding_window(self, monkeypatch: pytest.MonkeyPatch) -> None:
        now = [1000.0]
        monkeypatch.setattr(simulator_module, "_clock", lambda: now[0])
        sim = Simulator(rate_limit_per_minute=2)
        assert (await bulk(sim, event({"cookie": "c"}, "a"))).status == 200
        now[0] += 30
        assert (await batch(sim, v2_event({"cookie": "c"}, "b"))).status == 200
        for reply in (await bulk(sim, event({"cookie": "c"}, "x")),
                      await batch(sim, v2_event({"cookie": "c"}, "y"))):
            assert reply.status == 429
            assert reply.headers["retry-after"] == "1"
            assert reply.body["success"] is False
        assert [e["type"] for e in sim.events] == ["a", "b"]
        # The first request leaves the window; refused ones never entered it.
        now[0] += 30
        assert (await bulk(sim, event({"cookie": "c"}, "c"))).status == 200
        assert (await bulk(sim, event({"cookie": "c"}, "z"))).status == 429
        assert sim.stats()["by_status"] == {"200": 3, "429": 3}


class TestInspectionOverHttp:
    """The /_sim endpoints show what arrived; unknown paths are 404 and wrong methods 405."""

    async def test_events_customers_and_stats(self) -> None:
        sim = Simulator()
        await bulk(sim, event({"registered": "u1"}, "a"), event({"cookie": "c"}, "b",
                                                                project="p2"))
        assert (await call(sim, "GET", "/_sim/events")).body == sim.events
        by_project = await call(sim, "GET", "/_sim/events", query="project=p2")
        assert [e["type"] for e in by_project.body] == ["b"]
        customers = (await call(sim, "GET", "/_sim/customers", query=f"project={PROJECT}")).body
        assert [(c["project"], c["ids"]) for c in customers] == [
            (PROJECT, {"registered": "u1", "cookies": []})]
        assert len((await call(sim, "GET", "/_sim/customers")).body) == 2
        stats = (await call(sim, "GET", "/_sim/stats")).body
        assert (stats["requests"], stats["events"], stats["events_by_type"]) == (
            1, 2, {"a": 1, "b": 1})

    async def test_summary_unknown_paths_and_methods(self) -> None:
        sim = Simulator()
        summary = (await call(sim, "GET", "/")).body
        assert summary["tracking"]["legacy"] == "POST /bulk"
        missing = await call(sim, "GET", "/nope")
        assert missing.status == 404
        assert missing.body["errors"] == ["no endpoint GET /nope; GET / lists the endpoints"]
        assert (await call(sim, "POST", "/track/v2/projects//batch")).status == 404
        wrong = await call(sim, "GET", "/bulk")
        assert (wrong.status, wrong.headers["allow"]) == (405, "POST")
        assert (await call(sim, "GET", "/_sim/reset")).status == 405
        assert sim.stats()["requests"] == 0


class TestReceived:
    """/_sim/received lists every processed command in arrival order, with its sender."""

    async def test_commands_in_arrival_order_with_result_and_sender(self) -> None:
        sim = Simulator(v2_auth={PROJECT: TOKEN})
        await call(sim, "POST", "/r1/bulk", {"commands": [
            event({"registered": "u1"}, "a"), {"name": "crm/nonsense", "data": {}}]})
        await bulk(sim, update({"cookie": "c"}, plan="pro"))
        await batch(sim, v2_event({"registered": "u2"}, "b"),
                    path=f"/r2/track/v2/projects/{PROJECT}/batch")
        got = [(r["n"], r["request"], r["via"], r["name"], r["result"]) for r in sim.received]
        assert got == [(0, 1, "r1", "crm/events", "ok"), (1, 1, "r1", "crm/nonsense", "error"),
                       (2, 2, "", "crm/customers", "ok"), (3, 3, "r2", "customers/events", "ok")]
        assert sim.received[2]["data"]["properties"] == {"plan": "pro"}
        assert sim.received[0]["at"] <= sim.received[3]["at"]
        # A prefixed path is the same endpoint: the event was applied as any other.
        assert [e["type"] for e in sim.events] == ["a", "b"]
        assert sim.requests[0]["path"] == "/r1/bulk"

    async def test_pages_over_http_and_not_kept_when_counting(self) -> None:
        sim = Simulator()
        await bulk(sim, *(event({"cookie": f"c{i}"}, "a", n=i) for i in range(5)))
        page = await call(sim, "GET", "/_sim/received", query="start=1&limit=2")
        assert [r["data"]["properties"]["n"] for r in page.body] == [1, 2]
        assert len((await call(sim, "GET", "/_sim/received")).body) == 5
        assert (await call(sim, "GET", "/_sim/received", query="start=x")).status == 400
        assert (await call(sim, "POST", "/_sim/received")).status == 405
        counting = Simulator(record=False)
        await bulk(counting, event({"cookie": "c"}))
        assert counting.received == []
        sim.reset()
        assert sim.received == []

    async def test_only_one_prefix_segment_names_a_sender(self) -> None:
        sim = Simulator()
        assert (await call(sim, "POST", "/a/b/bulk", {"commands": []})).status == 404
        assert (await call(sim, "GET", "/r1/bulk")).status == 405


class TestServing:
    """run_simulator serves the app on a real socket and reports its base URL."""

    async def test_over_a_socket(self) -> None:
        sim = Simulator(v2_auth={PROJECT: TOKEN})
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            assert url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=url) as client:
                legacy = await client.post("/bulk", json={"commands": [
                    event({"registered": "u1"}, "legacy")]})
                assert legacy.json() == {"success": True, "results": [{"status": "ok"}]}
                v2 = await client.post(V2_PATH, headers={"Authorization": TOKEN}, json={
                    "commands": [v2_event({"registered": "u1"}, "v2")]})
                assert v2.json() == {"success": True, "results": [{"success": True}]}
                denied = await client.post(V2_PATH, headers={"Authorization": "Token no"},
                                           json={"commands": []})
                assert (denied.status_code, denied.json()["errors"]) == (
                    400, ["Could not authenticate"])
                await client.post("/_sim/faults", json={"fail_requests": {
                    "status": 429, "count": 1, "retry_after": 2}})
                limited = await client.post("/bulk", json={"commands": []})
                assert (limited.status_code, limited.headers["retry-after"]) == (429, "2")
                events = (await client.get("/_sim/events")).json()
                assert [e["type"] for e in events] == ["legacy", "v2"]
                stats = (await client.get("/_sim/stats")).json()
                assert stats["by_status"] == {"200": 2, "400": 1, "429": 1}
            nursery.cancel_scope.cancel()


class TestCommandLine:
    """The CLI refuses bad options in one line, reports a taken port and stops cleanly on
    SIGTERM."""

    def test_bad_listen_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exited:
            main(["--listen", "nowhere"])
        assert exited.value.code == 2
        assert "--listen: expected HOST:PORT, got 'nowhere'" in capsys.readouterr().err

    def test_taken_port_exits_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert main(["--listen", f"127.0.0.1:{port}"]) == 1
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"simulator: cannot listen on 127.0.0.1:{port}: ")

    def test_sigterm_exits_0(self, tmp_path: Path) -> None:
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=str(root))
        process = subprocess.Popen(
            [sys.executable, "-m", "router.simulator", "--listen", "127.0.0.1:0", "--counting"],
            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        try:
            assert process.stderr is not None
            line = process.stderr.readline()
            assert line.startswith("simulator: listening on http://127.0.0.1:"), line
            url = line.split()[3]
            assert httpx.get(f"{url}/_sim/stats").json()["record"] is False
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
