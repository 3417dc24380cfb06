"""The ``cluster`` bench scenario's pieces: the capacity model, its table, the load spread over
several relays, and the Redis-mode stack (every process on 127.0.0.1, all stopped)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import trio

from bench import load, report
from bench.plot import plot
from bench.scenarios import capacity
from bench.stack import ClusterStack

from .redisserver import available as redis_available
from .redisserver import required as redis_required


def test_the_capacity_model_divides_a_shards_budget_by_one_relays_rate() -> None:
    # Redis at 80% of a core and 32 µs a message: 25,000 msg/s. A relay at 80 µs a
    # message on a core of its own: 12,500 msg/s. So one shard keeps 2 relays busy.
    assert capacity(80.0, 32.0) == {"shard_msgs_per_s": 25_000,
                                    "relay_msgs_per_s_per_core": 12_500,
                                    "relays_per_shard": 2.0}
    assert capacity(None, 32.0)["relays_per_shard"] is None
    assert capacity(80.0, 0.0)["shard_msgs_per_s"] is None


def _cluster_result() -> dict[str, Any]:
    phase = {"acked_per_s": 12_000.0, "delivered_per_s": 11_500.0, "commands_per_s": 11_500.0,
             "relay_cpu_us_per_msg": 80.0, "redis_cpu_us_per_msg": 32.0,
             "relay_cores_used": 0.9, "redis_cores_used": 0.4, "acked_messages": 36_000,
             "lost_messages": 0, "extra_deliveries": 0, "http_503": 0, "lag_p99_s": 0.3,
             **capacity(80.0, 32.0)}
    return {"scenario": "cluster", "metrics": {
        "partitions": 16, "redis_budget_of_a_core": 0.8, "codec_floor_us": 4.0,
        "forwarder_us": 8.0, "peak_rss_mb": 94.0, "lost_messages": 0,
        "phases": [{**phase, "relays": 1},
                   {**phase, "relays": 2, "acked_per_s": 13_000.0,
                    "relay_cpu_us_per_msg": 84.0}]},
        "targets": [{"name": "lost messages", "value": 0, "limit": 0, "unit": "msgs",
                     "op": "<=", "pass": True}]}


def test_the_summary_has_a_row_per_phase_and_the_capacity_table() -> None:
    header = {"mode": "quick", "timestamp": "2026-01-01T00:00:00Z",
              "machine": {"cores": 2, "python": "3.11", "platform": "linux",
                          "load_average": [0.1, 0.1, 0.1]},
              "floor_us": {"batch": 4.0}, "forwarder": {}}
    text = report.summary([_cluster_result()], header)
    lines = text.splitlines()
    one = next(line for line in lines if line.startswith("| cluster, 1 relay "))
    two = next(line for line in lines if line.startswith("| cluster, 2 relays "))
    cells = [c.strip() for c in two.strip("|").split("|")]
    assert cells[report.NUMBERS.index("acked msg/s")] == "13,000"
    assert cells[report.NUMBERS.index("relay CPU µs/msg")] == "84.0"
    assert [c.strip() for c in one.strip("|").split("|")][
        report.NUMBERS.index("acked")] == "36,000"
    row = next(line for line in lines if line.startswith("| 1 relay "))
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "1 relay", "12,000", "11,500", "80.0", "32.0", "0.90 / 0.40", "25,000", "12,500", "2.0"]
    assert "On this 2-core machine the relays, Redis" in text
    assert "CPU per message is the number that carries over" in text


def test_a_cluster_plot_draws_redis_beside_the_relays(tmp_path: Path) -> None:
    series = {"phases": [(0.0, 2.0, "1 relay"), (3.0, 5.0, "2 relays")],
              "marks": [(2.5, "relay 2 started")], "step_s": 0.5, "relays": 2,
              "acked_rate": {"t": [0.25, 3.25], "per_s": [10.0, 12.0]},
              "delivered_rate": {"t": [0.25, 3.25], "per_s": [9.0, 12.0]},
              "latency_ms": {"t": [0.25], "p50": [1.0], "p99": [3.0]},
              "refused_per_s": {"t": [], "count": []},
              "rss_mb": {"t": [0.0, 1.0], "mb": [40.0, 80.0]},
              "redis_rss_mb": {"t": [0.0, 1.0], "mb": [10.0, 11.0]}}
    out = tmp_path / "cluster.png"
    plot({"scenario": "cluster", "mode": "quick", "timestamp": "now", "series": series}, out)
    assert out.read_bytes().startswith(b"\x89PNG")


async def _counting_server(counts: dict[int, int], *,
                           task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                           ) -> None:
    """Answers every request ``{"success":true}``; counts requests by its port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    counts[port] = 0

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                buf = buf[length:]
                counts[port] += 1
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n"
                                      b'{"success":true}')

    task_status.started(port)
    await trio.serve_listeners(handle, listeners)


async def test_the_load_generator_deals_its_connections_over_every_url() -> None:
    counts: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(_counting_server, counts) for _ in range(2)]
        args = load.parse_args([*(a for p in ports for a in ("--url", f"http://127.0.0.1:{p}")),
                                "--connections", "4", "--duration", "0.5", "--batch-size",
                                "10", "--out", "unused.json"])
        result = await load.run(args)
        nursery.cancel_scope.cancel()
    assert all(counts[p] > 0 for p in ports), counts
    by_target = result["acked_by_target"]
    assert sorted(by_target) == sorted(f"127.0.0.1:{p}" for p in ports)
    assert sum(by_target.values()) == result["acked_messages"]
    assert by_target[f"127.0.0.1:{ports[0]}"] == counts[ports[0]] * 10


def test_one_url_is_still_accepted() -> None:
    args = load.parse_args(["--url", "http://127.0.0.1:1", "--duration", "1", "--out", "x"])
    assert isinstance(args, argparse.Namespace) and args.url == ["http://127.0.0.1:1"]


@pytest.mark.redis
async def test_the_cluster_stack_shares_the_partitions_and_stops_everything(
        tmp_path: Path) -> None:
    if not redis_available():
        if redis_required():
            pytest.fail("redis-server is not on PATH; .ci/run installs Debian's redis-server")
        pytest.skip("redis-server is not on PATH: the Redis tests did NOT run")
    stack = ClusterStack(tmp_path, relays=2, partitions=4)
    started: list[psutil.Process] = []
    try:
        await stack.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stack.sample_forever)
            assert await stack.wait_shared(20) == [4]
            await stack.add_relay()
            assert sorted(await stack.wait_shared(20)) == [2, 2]
            started = [psutil.Process(p.pid) for p in (*stack.relays, stack.sim, stack.redis)]
            for proc in started:
                addresses = {c.laddr.ip for c in proc.net_connections(kind="inet")
                             if c.status == psutil.CONN_LISTEN}
                assert addresses <= {"127.0.0.1"}, (proc.cmdline(), addresses)
            run = await stack.load("both", kind="batch", mode="closed", duration=0.5,
                                   connections=4, max_messages=2_000, urls=stack.active_urls)
            assert len(run.info["acked_by_target"]) == 2
            assert await stack.wait_delivered(stack.acked(), 20) is not None
            nursery.cancel_scope.cancel()
        assert stack.acked() == 2_000
        sample = await stack.sample_once()
        assert sample.redis_cpu_s is not None and sample.redis_cpu_s > 0
        assert sample.cpu_s is not None and sample.redis_rss_mb is not None
        assert await stack.outbox_length() >= 0
        usec = await stack.redis_command_usec()
        assert usec.get("evalsha", 0) > 0
    finally:
        stack.stop()
        await stack.aclose()
    assert stack.exits == {"relay 1": 0, "relay 2": 0, "simulator": 0, "redis-server": 0}
    assert started and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                               for p in started)
