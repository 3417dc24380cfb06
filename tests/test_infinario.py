from __future__ import annotations

import msgspec

from router.commands import Command, decode_command, encode_command
from router.infinario import V2, Dialect, Legacy, join_body

EVENT = Command("event", "tok", {"registered": "u1"}, {"a": 1}, 1700000000.5, "purchase")
CUSTOMER = Command("customer", "tok", {"cookie": "c1"}, {"name": "Ada"}, 1700000001.0)


def request_body(dialect: Dialect, *commands: Command) -> bytes:
    """A request body as the sender builds it: each command encoded once, then joined."""
    return join_body([dialect.encode(c) for c in commands])


class TestNeutralForm:
    """Dead letters keep a command's neutral form, which reads back unchanged."""

    def test_round_trip(self) -> None:
        command = Command("event", "tok", {"registered": "u1", "cookie": "c1"},
                          {"a": [1, {"b": None}], "é": "ü"}, 1700000000.25, "purchase")
        assert decode_command(encode_command(command)) == command


class TestWireForm:
    """A command's wire form reads back as the command, in either dialect."""

    def test_legacy_round_trip(self) -> None:
        dialect = Legacy()
        assert dialect.decode(dialect.encode(EVENT), "other") == EVENT
        back = dialect.decode(dialect.encode(CUSTOMER), "other")
        assert (back.kind, back.project, back.ids, back.properties) == (
            "customer", "tok", CUSTOMER.ids, CUSTOMER.properties)

    def test_v2_round_trip_takes_the_rows_project(self) -> None:
        dialect = V2({})
        assert dialect.decode(dialect.encode(EVENT), "tok") == EVENT
        assert dialect.decode(dialect.encode(CUSTOMER), "tok") == CUSTOMER


class TestLegacyEncoding:
    """Legacy bulk bodies carry crm/events and crm/customers with the project token in each."""

    def test_event_and_customer_shapes(self) -> None:
        body = msgspec.json.decode(request_body(Legacy(), EVENT, CUSTOMER))
        assert body == {"commands": [
            {"name": "crm/events", "data": {
                "customer_ids": {"registered": "u1"}, "project_id": "tok", "type": "purchase",
                "properties": {"a": 1}, "timestamp": 1700000000.5}},
            {"name": "crm/customers", "data": {
                "ids": {"cookie": "c1"}, "project_id": "tok", "properties": {"name": "Ada"}}},
        ]}

    def test_url_and_no_auth_header(self) -> None:
        dialect = Legacy()
        assert dialect.url("https://api.infinario.com/", "tok") == "https://api.infinario.com/bulk"
        assert "Authorization" not in dialect.headers("tok")


class TestLegacyVerdicts:
    """Legacy answers map to ok/retry/error per command, and transport failures to retries."""

    def test_per_command_statuses_and_missing_tail(self) -> None:
        answer = b'{"success": true, "results": [{"status": "ok"}, {"status": "retry"},' \
                 b' {"status": "error", "errors": ["bad"]}]}'
        verdict = Legacy().verdict(200, answer, 4, None)
        assert verdict.results is not None
        assert [r.outcome for r in verdict.results] == ["ok", "retry", "error", "retry"]
        assert verdict.results[2].errors == ("bad",)

    def test_all_ok_answers_and_ok_items_with_more_keys(self) -> None:
        for answer, count, outcomes in [
            (b'{"results": [{"status": "ok"}, {"status": "ok"}]}', 2, ["ok", "ok"]),
            (b'{"results": [{"status": "ok"}]}', 3, ["ok", "retry", "retry"]),
            (b'{"results": [{"status": "ok"}, {"status": "ok"}]}', 1, ["ok"]),
            (b'{"results": [{"status": "ok", "errors": []}, {"status": "ok"}]}', 2,
             ["ok", "ok"]),
            (b'{"results": [{"status": "ok"}, {"status": "OK"}]}', 2, ["ok", "error"]),
            (b'{"results": []}', 1, ["retry"]),
        ]:
            verdict = Legacy().verdict(200, answer, count, None)
            assert verdict.results is not None
            assert [r.outcome for r in verdict.results] == outcomes, answer

    def test_server_errors_and_429_retry_with_retry_after(self) -> None:
        assert Legacy().verdict(500, b"", 1, None).retry
        verdict = Legacy().verdict(429, b"", 1, "7")
        assert verdict.retry and verdict.retry_after == 7.0

    def test_other_4xx_is_final(self) -> None:
        verdict = Legacy().verdict(400, b'{"error": "nope"}', 2, None)
        assert verdict.results is None and not verdict.retry and not verdict.auth

    def test_unreadable_200_is_retried(self) -> None:
        assert Legacy().verdict(200, b"<html>", 1, None).retry


class TestV2:
    """v2 batches go to the project's URL with auth and update_timestamp on customer updates."""

    def test_shapes(self) -> None:
        dialect = V2({"tok": "Token secret"})
        assert dialect.url("https://api.exponea.com", "tok") == \
            "https://api.exponea.com/track/v2/projects/tok/batch"
        assert dialect.headers("tok")["Authorization"] == "Token secret"
        body = msgspec.json.decode(request_body(dialect, EVENT, CUSTOMER))
        assert body["commands"][0] == {"name": "customers/events", "data": {
            "customer_ids": {"registered": "u1"}, "event_type": "purchase",
            "timestamp": 1700000000.5, "properties": {"a": 1}}}
        assert body["commands"][1] == {"name": "customers", "data": {
            "customer_ids": {"cookie": "c1"}, "properties": {"name": "Ada"},
            "update_timestamp": 1700000001.0}}

    def test_results_by_position(self) -> None:
        answer = b'{"success": true, "results": [{"success": true},' \
                 b' {"success": false, "errors": ["x"]}]}'
        verdict = V2({}).verdict(200, answer, 2, None)
        assert verdict.results is not None
        assert [r.outcome for r in verdict.results] == ["ok", "error"]

    def test_could_not_authenticate_is_an_auth_failure(self) -> None:
        verdict = V2({}).verdict(400, b'{"success": false, "errors": ["Could not authenticate"]}',
                                 3, None)
        assert verdict.auth and not verdict.retry and verdict.results is None

    def test_whole_batch_4xx_fails_every_command(self) -> None:
        verdict = V2({}).verdict(400, b'{"success": false, "errors": ["bad batch"]}', 3, None)
        assert not verdict.auth and not verdict.retry and verdict.results is None

    def test_429_is_resent(self) -> None:
        assert V2({}).verdict(429, b"", 1, None).retry
