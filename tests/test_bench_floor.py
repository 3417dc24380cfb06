"""The benchmark's framework floor: the null app it measures and the ceilings it reports."""

from __future__ import annotations

import httpx
import msgspec
import trio

from bench import nullserver, report
from bench.framework import ceilings
from router.http import serve_asgi

FRAMEWORK = {
    "server": {
        "batch": {"us_per_request": 1500.0, "us_per_message": 15.0,
                  "max_requests_per_s_one_core": 667},
        "single": {"us_per_request": 1000.0, "us_per_message": 1000.0,
                   "max_requests_per_s_one_core": 1000},
    },
    "client": {"us_per_request": 1500.0, "us_per_command": 30.0, "commands_per_request": 50},
}


def test_ceilings_add_server_client_and_codec_floors() -> None:
    c = ceilings(FRAMEWORK, {"batch": 10.0, "single": 5.0}, commands_per_message=1.5)
    assert c["batch_least_us_per_msg"] == 15.0 + 45.0 + 10.0
    assert c["batch_max_msg_per_s_one_core"] == round(1e6 / 70.0)
    assert c["single_least_us_per_msg"] == 1000.0 + 45.0 + 5.0


def test_summary_uses_the_batch_run_commands_per_message() -> None:
    results = [{"scenario": "batch", "metrics": {"commands_per_s": 1300.0,
                                                 "delivered_per_s": 1000.0}}]
    lines = report.framework_lines(results, {"framework": FRAMEWORK,
                                             "floor_us": {"batch": 10.0, "single": 5.0}})
    text = "\n".join(lines)
    assert "batch 64.0 µs/msg" in text  # 15 + 30 * 1.3 + 10
    assert "single 1,035.0 µs/msg" in text  # no single run: one command per message
    assert "at most 1,000 req/s on one core" in text


def test_summary_says_when_the_floor_could_not_be_measured() -> None:
    lines = report.framework_lines([], {"framework": {"error": "BenchError: no answer\nmore"}})
    assert lines[0] == "Framework floor: not measured (BenchError: no answer)."


async def test_null_app_reads_the_body_and_answers() -> None:
    async with trio.open_nursery() as nursery:
        base = await nursery.start(serve_asgi, nullserver.app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=base) as client:
            track = await client.post("/v1/track", content=b'{"event":"x"}' * 5000)
            bulk = await client.post("/bulk", content=b'{"commands":[]}')
        nursery.cancel_scope.cancel()
    assert (track.status_code, track.content) == (200, b'{"success":true}')
    answer = msgspec.json.decode(bulk.content)
    assert answer["success"] is True
    assert answer["results"] == [{"status": "ok"}] * 50
