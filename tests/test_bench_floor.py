"""The benchmark's floors in the summary: the forwarder's cost and the relay's multiple of it."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.run import QUICK_RESULTS, RESULTS, parse_args
from bench.scenarios import ratio

FORWARDER = {
    "batch": {"us_per_message": 6.25, "us_per_request": 625.0, "acked_per_s": 24_000.0,
              "connections": 8},
    "single": {"us_per_message": 80.0, "us_per_request": 80.0, "acked_per_s": 5_000.0,
               "connections": 32},
}


def _header(forwarder: dict[str, Any]) -> dict[str, Any]:
    return {"mode": "quick", "timestamp": "2026-01-01T00:00:00Z",
            "machine": {"cores": 2, "python": "3.11", "platform": "linux",
                        "load_average": [0.1, 0.1, 0.1]},
            "floor_us": {"batch": 10.0, "single": 10.0}, "forwarder": forwarder}


def test_ratio_is_a_multiple_of_the_base_or_nothing() -> None:
    assert ratio(50.0, 6.25) == 8.0
    assert ratio(None, 6.25) is None
    assert ratio(50.0, None) is None


def test_summary_reports_the_forwarder_and_the_relay_multiple_of_it() -> None:
    batch = {"scenario": "batch", "metrics": {
        "relay_cpu_us_per_msg": 62.5, "codec_floor_us": 10.0, "cpu_floor_ratio": 6.2,
        "forwarder_us": 6.25, "cpu_forwarder_ratio": 10.0,
        "cpu_trend": [{"from_s": 0.0, "to_s": 10.0, "cpu_us_per_msg": 60.0},
                      {"from_s": 10.0, "to_s": 20.0, "cpu_us_per_msg": 65.0}]},
        "targets": [{"name": "relay CPU ÷ forwarder", "value": 10.0, "limit": 8,
                     "unit": "x", "op": "<=", "pass": False}]}
    text = report.summary([batch], _header(FORWARDER))
    assert "batch 6.25 µs/msg (625 µs/request; 24,000 msg/s acked on 8 connections)" in text
    assert "single 80.00 µs/msg" in text
    assert "| forwarder µs/msg | CPU ÷ forwarder |" in text
    row = next(line for line in text.splitlines() if line.startswith("| batch "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[report.NUMBERS.index("forwarder µs/msg")] == "6.25"
    assert cells[report.NUMBERS.index("CPU ÷ forwarder")] == "10.0"
    assert "Batch max-rate relay CPU µs/msg per 10.0 s: 60.0, 65.0." in text
    assert "relay CPU ÷ forwarder" in text and "FAIL" in text


def test_summary_says_when_the_forwarder_could_not_be_measured() -> None:
    lines = report.forwarder_lines({"forwarder": {"error": "BenchError: no answer\nmore"}})
    assert lines[0] == "Forwarder: not measured (BenchError: no answer)."


def test_quick_runs_write_outside_the_tracked_results() -> None:
    assert parse_args(["--quick"]).results == QUICK_RESULTS
    assert parse_args(["--full"]).results == RESULTS
    assert parse_args([]).results == RESULTS
    assert QUICK_RESULTS.parent == RESULTS
    assert parse_args(["--quick", "--results", "/tmp/x"]).results.as_posix() == "/tmp/x"
