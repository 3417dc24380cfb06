"""``make cluster-demo``: Redis, the simulator and three relays start, deliver, and all stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from .redisserver import available as redis_available
from .redisserver import free_port
from .redisserver import required as redis_required

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deploy" / "cluster_demo.py"
PARTITIONS = 12


def eventually(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"within {seconds} s: {what}")
        time.sleep(0.1)


def started_by(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def running(process: psutil.Process) -> bool:
    """Still alive as the same process (a reused pid is another process)."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The demo as ``make cluster-demo`` runs it, on free ports and in ``tmp_path``."""
    if not redis_available():
        if redis_required():
            pytest.fail("redis-server is not on PATH; .ci/run installs Debian's redis-server")
        pytest.skip("redis-server is not on PATH: the Redis tests did NOT run")
    ports = {"redis": free_port(), "simulator": free_port(),
             "relays": [free_port() for _ in range(3)]}
    args = [sys.executable, str(DEMO), "--dir", str(tmp_path / "demo"),
            "--partitions", str(PARTITIONS), "--redis-port", str(ports["redis"]),
            "--simulator-port", str(ports["simulator"])]
    for port in ports["relays"]:
        args += ["--relay-port", str(port)]
    out = (tmp_path / "demo.out").open("wb")
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    children: list[psutil.Process] = []
    info = {"process": process, "ports": ports, "children": children,
            "output": lambda: (tmp_path / "demo.out").read_text(errors="replace")}
    try:
        yield info
    finally:
        children.extend(started_by(process.pid))
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for child in children:
            if running(child):
                child.kill()
        out.close()


@pytest.mark.redis
def test_three_relays_deliver_and_ctrl_c_stops_everything(demo: dict[str, Any]) -> None:
    process: subprocess.Popen[bytes] = demo["process"]
    ports = demo["ports"]
    relays = [f"http://127.0.0.1:{port}" for port in ports["relays"]]
    sim = f"http://127.0.0.1:{ports['simulator']}"
    eventually(lambda: "Ctrl-C stops everything" in demo["output"]() or process.poll(), 60,
               "the demo's banner")
    assert process.poll() is None, demo["output"]()
    banner = demo["output"]()
    for url in relays:
        assert "-u demo: " in banner and f"{url}/v1/track" in banner
        assert f"{url}/health" in banner
    assert f"{sim}/_sim/events" in banner
    assert f"redis-cli -p {ports['redis']} " in banner

    children = started_by(process.pid)
    names = sorted(" ".join(c.cmdline()) for c in children)
    assert sum("redis-server" in n for n in names) == 1, names
    assert sum("router.simulator" in n for n in names) == 1, names
    assert sum(" serve --redis " in n and "--role all" in n for n in names) == 3, names
    demo["children"].extend(children)

    with httpx.Client(timeout=10) as client:
        # The relays share the project's partitions between them.
        def shared() -> bool:
            held = [client.get(f"{url}/health").json()["partitions_held"] for url in relays]
            return sum(held) == PARTITIONS and all(held)

        eventually(shared, 30, "the three relays hold every partition between them")

        sent: dict[str, str] = {}
        for i, url in enumerate(relays):
            batch = [{"type": "track", "userId": f"user-{i}-{n}", "event": "Signed Up",
                      "messageId": f"m-{i}-{n}", "properties": {"relay": i}}
                     for n in range(20)]
            answer = client.post(f"{url}/v1/batch", auth=("demo", ""),
                                 json={"batch": batch})
            assert answer.status_code == 200, answer.text
            assert answer.json()["accepted"] == 20
            sent.update({m["userId"]: str(i) for m in batch})

        def delivered() -> list[dict[str, Any]]:
            events = client.get(f"{sim}/_sim/events").json()
            mine = [e for e in events if e["type"] == "Signed Up"]
            return mine if len(mine) >= len(sent) else []

        events = eventually(delivered, 30, "every message at the simulator")
        assert len(events) == len(sent)
        assert {e["customer_ids"]["registered"]: str(e["properties"]["relay"])
                for e in events} == sent
        assert all(e["project"] == "demo-project" for e in events)

    process.send_signal(signal.SIGINT)
    assert process.wait(40) == 0, demo["output"]()
    assert "nothing it started is running" in demo["output"]()
    assert [c.pid for c in children if running(c)] == []
    for port in [ports["redis"], ports["simulator"], *ports["relays"]]:
        assert not listening(port), port


def test_without_redis_server_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(DEMO), "--dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env=dict(os.environ, PATH=str(empty)))
    assert done.returncode != 0
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "redis-server" in line and "apt-get install redis-server" in line
    assert not (tmp_path / "demo").exists()

