"""``infinario-router explain`` through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def explain(*args: str, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "router", "explain", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=full_env)


def explain_json(*args: str, messages: Any, env: dict[str, str] | None = None
                 ) -> list[dict[str, Any]]:
    result = explain("--json", *args, stdin=json.dumps(messages), env=env)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def notes(record: dict[str, Any]) -> set[tuple[str, str]]:
    return {(n["change"], n["key"]) for n in record["notes"]}


TRACK = {"type": "track", "userId": "ada", "event": "Order Completed",
         "timestamp": "2024-01-01T10:00:00Z",
         "properties": {"plan": {"name": "pro"}, "a.b": 1, "gone": {}},
         "context": {"os": {"name": "iOS"}}}


class TestExplainCommands:
    """Each message is shown with the commands it would produce and why keys changed."""

    def test_track_with_renames_and_unpacking(self) -> None:
        (record,) = explain_json("--rename", "Order Completed=hard_purchase", messages=TRACK)
        assert record["refused"] is None
        assert record["commands"] == [{
            "kind": "event", "event_type": "hard_purchase", "ids": {"registered": "ada"},
            "properties": {"os_name": "iOS", "plan_name": "pro", "a_b": 1},
            "timestamp": "2024-01-01T10:00:00Z"}]
        assert notes(record) == {("event_renamed", "event"), ("unpacked", "properties.plan"),
                                 ("renamed", "properties.a.b"), ("dropped", "properties.gone"),
                                 ("unpacked", "context.os")}

    def test_human_output(self, tmp_path: Path) -> None:
        path = tmp_path / "m.json"
        path.write_text(json.dumps(TRACK))
        result = explain(str(path))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "message 1: track 'Order Completed'"
        assert lines[1] == ('  event Order Completed  ids {"registered": "ada"}  '
                            "at 2024-01-01T10:00:00Z")
        assert "  unpacked: properties.plan: into plan_name" in lines
        assert any(line.startswith("  renamed: properties.a.b: 'a.b' becomes 'a_b'")
                   for line in lines)

    def test_refusals_and_limits(self) -> None:
        records = explain_json(
            "--max-customer-keys", "1", "--max-event-types", "1",
            messages=[{"type": "track", "userId": "u", "event": "campaign"},
                      {"type": "track", "userId": "u", "event": "First"},
                      {"type": "track", "userId": "u", "event": "Second"},
                      {"type": "identify", "userId": "u", "traits": {"a": 1, "b": 2}},
                      {"type": "track", "event": "no ids"}])
        assert [r["refused"] and r["refused"]["code"] for r in records] == [
            "reserved_event_type", None, "event_type_limit", None, "missing_id"]
        assert records[3]["commands"][0]["properties"] == {"a": 1}
        assert ("dropped", "b") in notes(records[3])

    def test_allow_campaign_and_config_file(self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text('allow_campaign = true\nrename = { "Bought" = "purchase" }\n')
        messages = [{"type": "track", "userId": "u", "event": "campaign"},
                    {"type": "track", "userId": "u", "event": "Bought"}]
        for args, env in ((("--config", str(path)), None), ((), {"ROUTER_CONFIG": str(path)})):
            records = explain_json(*args, messages=messages, env=env)
            assert [r["commands"][0]["event_type"] for r in records] == ["campaign", "purchase"]

    def test_sessions_carry_across_messages_per_customer(self) -> None:
        def page(who: str, at: str) -> dict[str, Any]:
            return {"type": "page", "anonymousId": who, "timestamp": at}

        records = explain_json("--session-timeout", "60", messages=[
            page("a", "2024-01-01T10:00:00Z"), page("b", "2024-01-01T10:00:30Z"),
            page("a", "2024-01-01T10:00:30Z"), page("a", "2024-01-01T10:05:00Z")])
        types = [[c["event_type"] for c in r["commands"]] for r in records]
        assert types == [["session_start", "page_visit"], ["session_start", "page_visit"],
                         ["page_visit"], ["session_end", "session_start", "page_visit"]]
        assert records[3]["commands"][0]["properties"] == {"duration": 30.0}

    def test_batch_body_with_shared_context(self) -> None:
        records = explain_json(messages={
            "batch": [{"type": "track", "userId": "u", "event": "E"},
                      {"type": "group", "userId": "u", "groupId": "g", "traits": {"n": 1}}],
            "context": {"ip": "10.0.0.1"}})
        assert records[0]["commands"][0]["properties"] == {"ip": "10.0.0.1"}
        assert records[1]["commands"][0]["properties"] == {"group_id": "g", "group_n": 1}


class TestExplainBadInput:
    """Input that is not Segment messages is one line and exit 2, never a traceback."""

    def check(self, result: subprocess.CompletedProcess[str], start: str) -> None:
        assert result.returncode == 2
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith("infinario-router: explain: " + start), line

    def test_not_json(self) -> None:
        self.check(explain(stdin="{nope"), "the input is not valid JSON")

    def test_empty(self) -> None:
        self.check(explain("-", stdin=""), "the input is empty")

    def test_not_messages(self) -> None:
        self.check(explain(stdin="42"), "expected a Segment message")

    def test_single_invalid_message(self) -> None:
        self.check(explain(stdin='{"type": "track", "event": "x"}'),
                   "not a Segment message: userId or anonymousId is required")

    def test_malformed_batch(self) -> None:
        self.check(explain(stdin='{"batch": 3}'), "batch request is malformed")

    def test_missing_file(self, tmp_path: Path) -> None:
        self.check(explain(str(tmp_path / "none.json")), "cannot read")

    def test_too_deep(self) -> None:
        self.check(explain(stdin='{"p": ' + "[" * 5000 + "]" * 5000 + "}"),
                   "JSON nests deeper than")

    def test_bad_flag_value(self) -> None:
        result = explain("--max-event-keys", "lots", stdin="{}")
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "infinario-router: max-event-keys: expected a whole number, got 'lots'"]

    def test_help_says_merges_are_not_simulated(self) -> None:
        result = explain("--help")
        assert result.returncode == 0
        assert "identity merges" in " ".join(result.stdout.split())
