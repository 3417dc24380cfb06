"""The client floor per transport: httpx's own against the relay's ``router.transport``.

Posts legacy bulk bodies of 50 commands (``bench.data.legacy_bodies``) to the
simulator in counting mode (another process), with as many lanes as the relay
has by default, each with one request in flight, and times this process's CPU
per request. The two transports take turns, so drift on a shared machine hits
both alike.

    python -m bench.transportfloor [--seconds 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from router.config import DEFAULT_CONCURRENCY
from router.infinario import MAX_COMMANDS
from router.transport import Transport

from .data import Messages, legacy_bodies
from .stack import HOST, START_TIMEOUT, BenchError, Process, free_port, wait_http

TIMEOUT = {"connect": 10.0, "read": 30.0, "write": 30.0, "pool": 30.0}
HEADERS = {"content-type": "application/json"}


def _bodies(lanes: int) -> list[bytes]:
    gen = Messages(customers=10_000, id_prefix="transport-floor-")
    messages = [msgspec.json.decode(gen.next()[1]) for _ in range(lanes * MAX_COMMANDS)]
    return [msgspec.json.encode(b) for b in legacy_bodies(messages, per_body=MAX_COMMANDS)]


async def _run(transport: httpx.AsyncBaseTransport, url: str, bodies: list[bytes],
               seconds: float) -> dict[str, Any]:
    """One timed run: every lane posts its body again and again for ``seconds``."""
    count = 0

    async def post(body: bytes) -> None:
        request = httpx.Request("POST", url, headers=HEADERS, content=body,
                                extensions={"timeout": TIMEOUT})
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise BenchError(f"the simulator answered {response.status_code}")

    async def lane(body: bytes, until: float) -> None:
        nonlocal count
        while time.monotonic() < until:
            await post(body)
            count += 1

    for body in bodies:  # open the connections before timing
        await post(body)
    cpu0, t0 = time.process_time(), time.monotonic()
    async with trio.open_nursery() as nursery:
        for body in bodies:
            nursery.start_soon(lane, body, t0 + seconds)
    cpu1, t1 = time.process_time(), time.monotonic()
    return {"requests": count, "requests_per_s": round(count / (t1 - t0), 1),
            "us_per_request": round((cpu1 - cpu0) / count * 1e6, 1)}


def _transports(lanes: int) -> dict[str, Callable[[], httpx.AsyncBaseTransport]]:
    limits = httpx.Limits(max_connections=lanes, max_keepalive_connections=lanes)
    return {
        "httpx": lambda: httpx.AsyncHTTPTransport(limits=limits),
        "router.transport": lambda: Transport(max_connections=lanes),
    }


async def transport_floor(workdir: Path, *, seconds: float, rounds: int,
                          lanes: int = DEFAULT_CONCURRENCY) -> dict[str, Any]:
    """CPU µs per 50-command POST through each transport, ``rounds`` turns each."""
    bodies = _bodies(lanes)
    port = free_port()
    simulator = Process("simulator", [sys.executable, "-m", "router.simulator", "--counting",
                                      "--listen", f"{HOST}:{port}"],
                        workdir / "simulator.log")
    base = f"http://{HOST}:{port}"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in _transports(lanes)}
    try:
        simulator.start()
        await wait_http(simulator, f"{base}/", START_TIMEOUT)
        for _ in range(rounds):
            for name, make in _transports(lanes).items():
                async with make() as transport:
                    runs[name].append(await _run(transport, f"{base}/bulk", bodies, seconds))
    finally:
        simulator.stop(5.0)
    return {
        "lanes": lanes, "commands_per_request": MAX_COMMANDS,
        "body_bytes": round(sum(map(len, bodies)) / len(bodies)),
        "transports": {
            name: {"us_per_request": min(r["us_per_request"] for r in rs),
                   "us_per_request_runs": [r["us_per_request"] for r in rs],
                   "requests_per_s": max(r["requests_per_s"] for r in rs)}
            for name, rs in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transportfloor",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per timed run (3)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per transport (2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = trio.run(lambda: transport_floor(Path(tmp), seconds=args.seconds,
                                                  rounds=args.rounds))
    print(f"{result['lanes']} lanes, {result['commands_per_request']} commands "
          f"({result['body_bytes']:,} bytes) per POST to the simulator in counting mode")
    for name, r in result["transports"].items():
        runs = ", ".join(f"{us:g}" for us in r["us_per_request_runs"])
        print(f"  {name:17} {r['us_per_request']:7.1f} µs CPU per request (best of {runs}); "
              f"{r['requests_per_s']:,.0f} req/s")
    print(msgspec.json.format(msgspec.json.encode(result), indent=1).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
