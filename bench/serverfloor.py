"""The server floor: CPU per request of ``router.server`` with a handler that does nothing.

``python -m bench.serverfloor`` serves a null handler (reads the body, answers
``{"success":true}``) in a child process on 127.0.0.1 and drives it with
``bench.load`` as the relay's max-rate phases are driven: 8 connections of
100-message batches, then 32 connections of single messages. It prints the
server process's CPU µs per request for both; 1e6 / µs is the most requests a
second one core can serve before the relay does any work.
``--serve HOST:PORT`` runs only the null server (the child process).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

from router.cli import tune_gc
from router.config import parse_listen
from router.server import Request, RequestHead, Response, Route, serve

from .measure import cpu_seconds
from .stack import HOST, START_TIMEOUT, BenchError, Process, free_port, run_load, wait_http

OK = Response(200, b'{"success":true}')
KINDS = {"batch": 8, "single": 32}  # connections, as bench.framework uses


class NullHandler:
    """Reads every body (limit 1 MiB) and answers at once."""

    def __init__(self) -> None:
        self._route = Route(1024 * 1024, self.call)

    def route(self, head: RequestHead) -> Route:
        return self._route

    async def call(self, request: Request) -> Response:
        return OK


async def _measure(workdir: Path, url: str, proc: psutil.Process, kind: str,
                   connections: int, seconds: float) -> dict[str, Any]:
    def load(name: str, duration: float) -> list[str]:
        return [sys.executable, "-m", "bench.load", "--url", url, "--kind", kind,
                "--mode", "closed", "--duration", str(duration), "--connections",
                str(connections), "--out", str(workdir / name)]

    warm = min(1.0, seconds / 2)
    await run_load(load(f"{kind}-warm.json", warm), workdir / f"{kind}-warm.json", warm)
    cpu0 = cpu_seconds(proc)
    requests = await run_load(load(f"{kind}.json", seconds), workdir / f"{kind}.json", seconds)
    cpu1 = cpu_seconds(proc)
    answered = requests.count(200)
    if not answered or cpu0 is None or cpu1 is None:
        raise BenchError(f"the null server answered no {kind} requests")
    per_request = (cpu1 - cpu0) / answered * 1e6
    return {"kind": kind, "connections": connections, "requests": answered,
            "requests_per_s": round(answered / (requests.end - requests.start), 1),
            "us_per_request": round(per_request, 1),
            "us_per_message": round(per_request * answered / requests.acked(), 2),
            "max_requests_per_s_one_core": round(1e6 / per_request)}


async def server_floor(workdir: Path, seconds: float) -> list[dict[str, Any]]:
    port = free_port()
    server = Process("serverfloor", [sys.executable, "-m", "bench.serverfloor", "--serve",
                                     f"{HOST}:{port}"], workdir / "serverfloor.log")
    url = f"http://{HOST}:{port}"
    try:
        server.start()
        await wait_http(server, f"{url}/health", START_TIMEOUT)
        proc = psutil.Process(server.pid)
        return [await _measure(workdir, url, proc, kind, n, seconds)
                for kind, n in KINDS.items()]
    finally:
        server.stop(5.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serverfloor",
                                description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per kind (5)")
    p.add_argument("--serve", metavar="HOST:PORT", help="only run the null server")
    args = p.parse_args(argv)
    if args.serve:
        host, port = parse_listen(args.serve)
        tune_gc()  # the served relay's collector settings, so the floors compare
        try:
            trio.run(serve, NullHandler(), host, port)
        except KeyboardInterrupt:
            pass
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = trio.run(server_floor, Path(tmp), args.seconds)
    for r in results:
        print(f"{r['kind']:>6}: {r['us_per_request']:7.1f} µs/request "
              f"({r['us_per_message']} µs/message) over {r['requests']} requests on "
              f"{r['connections']} connections; at most {r['max_requests_per_s_one_core']:,} "
              "requests/s on one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
