"""The load generator: raw HTTP/1.1 over keep-alive trio sockets.

Run as its own process so its CPU is not the relay's::

    python -m bench.load --url http://127.0.0.1:8080 --kind batch --mode closed \\
        --connections 8 --duration 20 --out closed.json

``--url`` may be given more than once: the connections are dealt over the
relays in turn (connection *i* to relay *i* mod *n*), one message sequence for all.

``closed``: each connection sends its next request as soon as the previous one
is answered (the relay's maximum rate). ``open``: requests are due at a fixed
rate whatever the answers, and latency counts from when a request was due, so
a stall shows up as latency instead of silently lowering the rate.

Requests are written pre-built and answers are parsed just far enough (status
line, headers, a ``Content-Length`` or chunked body): the generator must not be
the bottleneck. A 503/429 makes that connection wait ``Retry-After`` (capped by
``--max-backoff``) like a Segment client would; its messages are not resent
(they were not accepted, so nothing is owed for them).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio

from .data import BASIC_AUTH, Messages, body_factory

BUCKET = 0.1  # seconds per point of the acked-over-time series
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
RECONNECT_PAUSE = 0.05


class ConnectionLost(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buf = bytearray()

    async def connect(self) -> None:
        await self.close()
        self.buf.clear()
        with trio.fail_after(CONNECT_TIMEOUT):
            self.stream = await trio.open_tcp_stream(self.host, self.port)

    async def close(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with trio.move_on_after(1):
                await stream.aclose()

    async def request(self, data: bytes) -> tuple[int, bytes, float | None]:
        """Send one request; return (status, body, Retry-After)."""
        if self.stream is None:
            await self.connect()
        assert self.stream is not None
        await self.stream.send_all(data)
        status, body, retry_after, close = await self._read_response()
        if close:
            await self.close()
        return status, body, retry_after

    async def _fill(self) -> None:
        assert self.stream is not None
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionLost("connection closed by the relay")
        self.buf += chunk

    async def _read_until(self, marker: bytes) -> bytes:
        while (end := self.buf.find(marker)) < 0:
            await self._fill()
        out = bytes(self.buf[:end])
        del self.buf[:end + len(marker)]
        return out

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _read_response(self) -> tuple[int, bytes, float | None, bool]:
        head = await self._read_until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        status = int(parts[1])
        length = 0
        chunked = close = False
        retry_after: float | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
            elif name == b"retry-after":
                try:
                    retry_after = float(value)
                except ValueError:
                    retry_after = None
        if chunked:
            body = bytearray()
            while True:
                size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._read_until(b"\r\n")
                    break
                body += await self._read_exact(size)
                await self._read_exact(2)
            return status, bytes(body), retry_after, close
        return status, await self._read_exact(length), retry_after, close


@dataclass
class Recorder:
    """Per request: when it was due (or sent), latency, status and messages acked."""

    t: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    sent_messages: int = 0
    rejected_messages: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    late_tickets: int = 0
    acked_by_target: dict[str, int] = field(default_factory=dict)  # "host:port" -> messages

    def add(self, t: float, latency: float, status: int, messages: int) -> None:
        self.t.append(round(t, 6))
        self.latency.append(round(latency, 6))
        self.status.append(status)
        self.messages.append(messages)

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


_decode_ack = msgspec.json.Decoder().decode


class Client:
    """Builds requests, sends them over a connection and records the answers."""

    def __init__(self, args: argparse.Namespace, targets: list[tuple[str, int]],
                 recorder: Recorder) -> None:
        self.messages = Messages(customers=args.customers, id_prefix=args.id_prefix,
                                 seq_start=args.seq_start)
        self.bodies = body_factory(self.messages, args.kind, args.batch_size)
        self.heads = {
            (host, port): b"POST %b HTTP/1.1\r\nHost: " + f"{host}:{port}".encode()
            + b"\r\nUser-Agent: infinario-router-bench\r\nContent-Type: application/json"
            b"\r\nAuthorization: " + BASIC_AUTH + b"\r\nContent-Length: %d\r\n\r\n"
            for host, port in targets}
        self.max_messages = args.max_messages or math.inf
        self.max_backoff = args.max_backoff
        self.recorder = recorder
        self.targets = targets

    def target(self, i: int) -> tuple[str, int]:
        """Where connection ``i`` goes: the relays in turn."""
        return self.targets[i % len(self.targets)]

    def budget_left(self) -> bool:
        return self.recorder.sent_messages < self.max_messages

    async def exchange(self, conn: Connection, due: float) -> None:
        """One request; latency counts from ``due``."""
        path, body, n = self.bodies()
        self.recorder.sent_messages += n
        request = self.heads[conn.host, conn.port] % (path.encode(), len(body)) + body
        rec = self.recorder
        status = 0
        answer = b""
        retry_after: float | None = None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                status, answer, retry_after = await conn.request(request)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLost,
                trio.TooSlowError, ValueError, IndexError) as exc:
            rec.error(exc)
            await conn.close()
            await trio.sleep(RECONNECT_PAUSE)
        acked = 0
        if status == 200:
            acked = n
            if answer.startswith(b'{"success":true,"accepted"'):
                ack = _decode_ack(answer)
                acked = ack["accepted"] + ack.get("duplicates", 0)
                rec.rejected_messages += len(ack.get("rejected", ()))
            where = f"{conn.host}:{conn.port}"
            rec.acked_by_target[where] = rec.acked_by_target.get(where, 0) + acked
        rec.add(due, time.monotonic() - due, status, acked)
        if status in (429, 503):
            await trio.sleep(min(retry_after if retry_after is not None else 1.0,
                                 self.max_backoff))


async def closed_worker(client: Client, deadline: float, target: tuple[str, int]) -> None:
    conn = Connection(*target)
    try:
        while time.monotonic() < deadline and client.budget_left():
            await client.exchange(conn, time.monotonic())
    finally:
        await conn.close()


async def open_worker(client: Client, tickets: trio.MemoryReceiveChannel[float],
                      target: tuple[str, int]) -> None:
    conn = Connection(*target)
    try:
        async for due in tickets:
            await client.exchange(conn, due)
    finally:
        await conn.close()


async def schedule(rps: float, start: float, deadline: float, client: Client,
                   tickets: trio.MemorySendChannel[float]) -> None:
    """Issue one ticket per request at a fixed rate until the deadline or budget."""
    async with tickets:
        i = 0
        while client.budget_left():
            due = start + i / rps
            if due >= deadline:
                break
            await trio.sleep(max(0.0, due - time.monotonic()))
            try:
                tickets.send_nowait(due)
            except trio.WouldBlock:
                # Every connection is busy and the queue is full: the rate cannot be held.
                client.recorder.late_tickets += 1
            i += 1


def buckets(rec: Recorder, start: float, end: float) -> dict[str, Any]:
    """Acked messages and 503/429 answers per ``BUCKET`` seconds, by time of the answer."""
    count = int((end - start) / BUCKET) + 1
    acked = [0] * count
    refused = [0] * count
    for t, lat, status, n in zip(rec.t, rec.latency, rec.status, rec.messages, strict=True):
        i = min(count - 1, max(0, int((t + lat - start) / BUCKET)))
        if status == 200:
            acked[i] += n
        elif status in (429, 503):
            refused[i] += 1
    return {"width": BUCKET, "acked": acked, "refused": refused}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = []
    for given in args.url:
        url = urlsplit(given)
        targets.append((url.hostname or "127.0.0.1", url.port or 80))
    recorder = Recorder()
    client = Client(args, targets, recorder)
    cpu0 = _cpu()
    start = time.monotonic()
    deadline = start + args.duration
    async with trio.open_nursery() as nursery:
        if args.mode == "closed":
            for i in range(args.connections):
                nursery.start_soon(closed_worker, client, deadline, client.target(i))
        else:
            per_request = args.batch_size if args.kind == "batch" else 1
            rps = args.rate / per_request
            send, receive = trio.open_memory_channel[float](max(64, int(rps)))
            nursery.start_soon(schedule, rps, start, deadline, client, send)
            async with receive:
                for i in range(args.connections):
                    nursery.start_soon(open_worker, client, receive.clone(), client.target(i))
    end = time.monotonic()
    return {
        "urls": args.url, "acked_by_target": recorder.acked_by_target,
        "kind": args.kind, "mode": args.mode, "connections": args.connections,
        "rate": args.rate, "batch_size": args.batch_size, "customers": args.customers,
        "duration": args.duration, "start": start, "end": end,
        "seq_start": args.seq_start, "seq_end": client.messages.seq,
        "sent_messages": recorder.sent_messages,
        "acked_messages": sum(m for m, s in zip(recorder.messages, recorder.status,
                                                strict=True) if s == 200),
        "rejected_messages": recorder.rejected_messages,
        "errors": recorder.errors, "late_tickets": recorder.late_tickets,
        "cpu_seconds": round(_cpu() - cpu0, 3),
        "buckets": buckets(recorder, start, end),
        "requests": {"t": recorder.t, "latency": recorder.latency, "status": recorder.status,
                     "messages": recorder.messages},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, action="append",
                   help="the relay, http://127.0.0.1:PORT; repeat it to deal the connections "
                   "over several relays in turn")
    p.add_argument("--kind", choices=["batch", "single"], default="batch")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--duration", type=float, required=True, help="seconds of sending")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: messages per second")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--customers", type=int, default=10_000)
    p.add_argument("--max-messages", type=int, default=0, help="stop after this many (0: none)")
    p.add_argument("--seq-start", type=int, default=0,
                   help="first message number (customers follow from it)")
    p.add_argument("--id-prefix", default="", help="messageId prefix (default: random)")
    p.add_argument("--max-backoff", type=float, default=0.5,
                   help="cap on the Retry-After wait after a 503/429")
    p.add_argument("--out", required=True, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.mode == "open" and args.rate <= 0:
        p.error("--mode open needs --rate")
    if args.duration <= 0 or args.duration > 3600:
        p.error("--duration must be within (0, 3600] seconds")
    if not args.id_prefix:
        args.id_prefix = f"b{secrets.token_hex(4)}-"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = trio.run(run, args)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(result))
    os.replace(tmp, args.out)
    print(f"load: {result['acked_messages']} acked of {result['sent_messages']} sent in "
          f"{result['end'] - result['start']:.1f}s; cpu {result['cpu_seconds']}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
