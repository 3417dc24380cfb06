"""The framework floor: what the HTTP server and client cost before the relay works.

The relay is an ASGI app on hypercorn's trio worker and posts to Infinario with
httpx's transport. Both cost CPU per request whatever the relay does, and on a
small machine that cost alone can cap a scenario:

- ``server``: the CPU per request of ``bench.nullserver`` (an app that reads the
  body and answers) under the same load generator, bodies and connections as
  the relay's ``single`` and ``batch`` scenarios. 1e6 / µs is the most requests
  per second one core can serve with this server, before any relay work.
- ``client``: the CPU per request of posting legacy bulk bodies of 50 commands
  through ``httpx.AsyncHTTPTransport`` under trio, with as many requests in
  flight as the relay has lanes, measured in this process against the null
  server in another.

Together with the codec floor they give the least CPU a message can cost with
this stack; the summary prints them next to the targets.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil  # type: ignore[import-untyped]
import trio

from router.config import DEFAULT_CONCURRENCY
from router.infinario import MAX_COMMANDS

from .data import Messages, legacy_bodies
from .measure import Requests, cpu_seconds
from .stack import HOST, START_TIMEOUT, BenchError, Process, free_port, run_load, wait_http


async def _load(url: str, out: Path, kind: str, seconds: float, connections: int) -> Requests:
    args = [sys.executable, "-m", "bench.load", "--url", url, "--kind", kind, "--mode", "closed",
            "--duration", str(seconds), "--connections", str(connections), "--out", str(out)]
    return await run_load(args, out, seconds)


def _null_server(workdir: Path, name: str) -> tuple[Process, str]:
    """The null app as its own process (not started yet) and its base URL."""
    port = free_port()
    server = Process("nullserver", [sys.executable, "-m", "bench.nullserver", "--listen",
                                    f"{HOST}:{port}"], workdir / f"nullserver-{name}.log")
    return server, f"http://{HOST}:{port}"


async def server_floor(workdir: Path, kind: str, *, seconds: float,
                       connections: int) -> dict[str, Any]:
    """CPU µs per request of the null app on hypercorn's trio worker, as the relay is served."""
    server, url = _null_server(workdir, kind)
    try:
        server.start()
        await wait_http(server, f"{url}/health", START_TIMEOUT)
        proc = psutil.Process(server.pid)
        await _load(url, workdir / f"framework-{kind}-warm.json", kind, min(1.0, seconds / 2),
                    connections)
        cpu0 = cpu_seconds(proc)
        requests = await _load(url, workdir / f"framework-{kind}.json", kind, seconds,
                               connections)
        cpu1 = cpu_seconds(proc)
    finally:
        server.stop(5.0)
    answered = requests.count(200)
    if not answered or cpu0 is None or cpu1 is None:
        raise BenchError(f"the null server answered no {kind} requests")
    per_request = (cpu1 - cpu0) / answered * 1e6
    messages = requests.acked() / answered
    return {"kind": kind, "requests": answered, "seconds": seconds,
            "requests_per_s": round(answered / (requests.end - requests.start), 1),
            "us_per_request": round(per_request, 1),
            "us_per_message": round(per_request / messages, 2),
            "max_requests_per_s_one_core": round(1e6 / per_request)}


async def client_floor(workdir: Path, *, seconds: float,
                       lanes: int = DEFAULT_CONCURRENCY) -> dict[str, Any]:
    """CPU µs per legacy bulk POST of 50 commands through httpx's transport under trio."""
    gen = Messages(customers=10_000, id_prefix="client-floor-")
    messages = [msgspec.json.decode(gen.next()[1]) for _ in range(lanes * MAX_COMMANDS)]
    bodies = [msgspec.json.encode(b) for b in legacy_bodies(messages, per_body=MAX_COMMANDS)]
    server, base = _null_server(workdir, "client")
    url = f"{base}/bulk"
    headers = {"content-type": "application/json"}
    timeout = {"connect": 10.0, "read": 30.0, "write": 30.0, "pool": 30.0}
    limits = httpx.Limits(max_connections=lanes, max_keepalive_connections=lanes)
    count = 0

    async def post(transport: httpx.AsyncHTTPTransport, body: bytes) -> None:
        request = httpx.Request("POST", url, headers=headers, content=body,
                                extensions={"timeout": timeout})
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise BenchError(f"the null server answered {response.status_code}")

    async def lane(transport: httpx.AsyncHTTPTransport, body: bytes, until: float) -> None:
        nonlocal count
        while time.monotonic() < until:
            await post(transport, body)
            count += 1

    try:
        server.start()
        await wait_http(server, f"{base}/health", START_TIMEOUT)
        async with httpx.AsyncHTTPTransport(limits=limits) as transport:
            for body in bodies:  # open the connections before timing
                await post(transport, body)
            cpu0, t0 = time.process_time(), time.monotonic()
            async with trio.open_nursery() as nursery:
                for body in bodies:
                    nursery.start_soon(lane, transport, body, t0 + seconds)
            cpu1, t1 = time.process_time(), time.monotonic()
    finally:
        server.stop(5.0)
    per_request = (cpu1 - cpu0) / count * 1e6
    return {"requests": count, "seconds": round(t1 - t0, 2), "lanes": lanes,
            "commands_per_request": MAX_COMMANDS,
            "body_bytes": round(sum(map(len, bodies)) / len(bodies)),
            "requests_per_s": round(count / (t1 - t0), 1),
            "us_per_request": round(per_request, 1),
            "us_per_command": round(per_request / MAX_COMMANDS, 2)}


async def framework_floor(workdir: Path, *, seconds: float,
                          connections: dict[str, int]) -> dict[str, Any]:
    """Both floors; ``connections`` per body kind, as the max-rate phases use."""
    return {
        "server": {kind: await server_floor(workdir, kind, seconds=seconds, connections=n)
                   for kind, n in connections.items()},
        "client": await client_floor(workdir, seconds=seconds),
    }


def ceilings(framework: dict[str, Any], codec_us: dict[str, float],
             commands_per_message: float) -> dict[str, float]:
    """The least CPU per message the stack allows, and the rates that caps on one core."""
    server = framework["server"]
    client_us = framework["client"]["us_per_command"] * commands_per_message
    out: dict[str, float] = {}
    for kind in server:
        least = server[kind]["us_per_message"] + client_us + codec_us.get(kind, 0.0)
        out[f"{kind}_least_us_per_msg"] = round(least, 1)
        out[f"{kind}_max_msg_per_s_one_core"] = round(1e6 / least)
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(msgspec.json.format(msgspec.json.encode(
            trio.run(lambda: framework_floor(Path(tmp), seconds=5.0,
                                             connections={"single": 32, "batch": 8}))),
            indent=1).decode())
