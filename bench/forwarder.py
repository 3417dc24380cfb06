"""A bare stateless forwarder: the floor under what any relay can cost per message.

    python -m bench.forwarder --listen 127.0.0.1:PORT --upstream http://127.0.0.1:SIMPORT

It takes the same requests as the relay (``POST /v1/batch`` with the write key
in the body, ``POST /v1/<type>`` with Basic auth), decodes each body with
msgspec, turns every message into one legacy ``crm/events`` command, answers
``200 {"success":true}`` at once and posts the commands 50 to a ``POST /bulk``
over a few pooled keep-alive connections. No journal, no state, no dedup, no
retries: a command whose bulk fails is counted and dropped.

Plain asyncio and httptools, nothing else between the socket and the code, so
its CPU per message is what the unavoidable part of the job costs on this
machine: HTTP in, JSON in, JSON out, HTTP out. A relay's CPU divided by it
says how much its durability and semantics cost on top.

``GET /health`` answers 200; ``GET /stats`` answers the counters the benchmark
waits on (``received``, ``forwarded``, ``failed``, ``pending``, ``bulks``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import gc
import signal
import sys
import time
from collections import deque
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httptools
import msgspec

PER_BULK = 50  # the most commands Infinario's legacy /bulk takes in one request
DEFAULT_CONNECTIONS = 4
# A partial bulk waits at most this long for more commands before it is sent anyway.
LINGER = 0.02
# Bulks waiting for a connection: past HIGH the forwarder stops reading intake sockets
# until the queue is back under LOW. Without it a fast client and a slower upstream would
# pile up commands in memory without bound; with it the client waits, as it would on a
# relay whose delivery is the bottleneck.
HIGH_WATER = 64
LOW_WATER = 16
SINGLE_TYPES = frozenset({"track", "page", "screen", "identify", "group", "alias"})

OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
      b'{"success":true}')


class Message(msgspec.Struct):
    """The fields of a Segment message a command needs; the rest is skipped unparsed."""

    type: str | None = None
    userId: str | None = None
    anonymousId: str | None = None
    previousId: str | None = None
    event: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    timestamp: datetime | None = None


class Batch(msgspec.Struct):
    batch: list[Message]
    writeKey: str | None = None


class EventData(msgspec.Struct):
    customer_ids: dict[str, str]
    project_id: str
    type: str
    properties: dict[str, Any]
    timestamp: float


class Command(msgspec.Struct):
    name: str
    data: EventData


class Bulk(msgspec.Struct):
    commands: list[Command]


_decode_batch = msgspec.json.Decoder(Batch).decode
_decode_message = msgspec.json.Decoder(Message).decode
_encode = msgspec.json.Encoder().encode


def to_command(message: Message, project: str, now: float,
               kind: str | None = None) -> Command | None:
    """One message as one legacy ``crm/events`` command; None when it names no customer.

    ``kind`` is the type the path says (single messages may leave ``type`` out);
    the event type is the track's ``event``, else the message type.
    """
    ids: dict[str, str] = {}
    if message.userId:
        ids["registered"] = message.userId
    cookie = message.anonymousId or message.previousId
    if cookie:
        ids["cookie"] = cookie
    if not ids:
        return None
    event_type = message.event or message.type or kind or "track"
    properties = message.properties if message.properties is not None else (
        message.traits if message.traits is not None else {})
    stamp = message.timestamp.timestamp() if message.timestamp is not None else now
    return Command("crm/events", EventData(ids, project, event_type, properties, stamp))


def _basic_user(header: bytes | None) -> str | None:
    """The user part of ``Basic base64(user:password)`` (Segment puts the write key there)."""
    if not header or header[:6].lower() != b"basic ":
        return None
    try:
        return base64.b64decode(header[6:].strip(), validate=True).split(b":", 1)[0].decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def commands_of(path: bytes, body: bytes, auth: bytes | None, projects: dict[str, str],
                now: float) -> tuple[int, list[Command]]:
    """(HTTP status, commands) for one intake request."""
    if path == b"/v1/batch" or path == b"/v1/import":
        try:
            batch = _decode_batch(body)
        except msgspec.DecodeError:
            return 400, []
        project = projects.get(batch.writeKey or _basic_user(auth) or "")
        if project is None:
            return 401, []
        out = []
        for message in batch.batch:
            command = to_command(message, project, now)
            if command is not None:
                out.append(command)
        return 200, out
    kind = path[4:].decode("latin-1") if path.startswith(b"/v1/") else ""
    if kind not in SINGLE_TYPES:
        return 404, []
    project = projects.get(_basic_user(auth) or "")
    if project is None:
        return 401, []
    try:
        message = _decode_message(body)
    except msgspec.DecodeError:
        return 400, []
    command = to_command(message, project, now, kind)
    return 200, [] if command is None else [command]


class Stats:
    def __init__(self) -> None:
        self.received = 0   # commands made from intake requests
        self.forwarded = 0  # commands in bulks the upstream answered 200
        self.failed = 0     # commands in bulks that failed (dropped: no retries here)
        self.bulks = 0
        self.requests = 0

    def json(self, pending: int) -> bytes:
        return _encode({"received": self.received, "forwarded": self.forwarded,
                        "failed": self.failed, "pending": pending, "bulks": self.bulks,
                        "requests": self.requests})


class Upstream:
    """Cuts commands into bulks of ``PER_BULK`` and posts them over pooled connections."""

    def __init__(self, url: str, connections: int, stats: Stats) -> None:
        parts = urlsplit(url)
        self.paused: list[asyncio.Transport] = []
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = (parts.path.rstrip("/") + "/bulk").encode()
        self.head = (b"POST " + self.path + b" HTTP/1.1\r\nHost: "
                     + f"{self.host}:{self.port}".encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n")
        self.connections = connections
        self.stats = stats
        self.buffer: list[Command] = []
        self.bulks: deque[list[Command]] = deque()
        self.ready = asyncio.Event()
        self.in_flight = 0
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._lane()) for _ in range(self.connections)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def full(self) -> bool:
        return len(self.bulks) >= HIGH_WATER

    def wait_for_room(self, transport: asyncio.Transport) -> None:
        """Stop reading ``transport`` until the queue of bulks has drained below LOW."""
        transport.pause_reading()
        self.paused.append(transport)

    def _resume(self) -> None:
        paused, self.paused = self.paused, []
        for transport in paused:
            if not transport.is_closing():
                transport.resume_reading()

    def pending(self) -> int:
        return len(self.buffer) + sum(map(len, self.bulks)) + self.in_flight

    def add(self, commands: list[Command]) -> None:
        buffer = self.buffer
        buffer.extend(commands)
        while len(buffer) >= PER_BULK:
            self.bulks.append(buffer[:PER_BULK])
            del buffer[:PER_BULK]
            self.ready.set()
        if buffer and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(LINGER, self._flush)

    def _flush(self) -> None:
        self.timer = None
        if self.buffer:
            self.bulks.append(self.buffer)
            self.buffer = []
            self.ready.set()

    async def _lane(self) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while True:
                while not self.bulks:
                    self.ready.clear()
                    await self.ready.wait()
                bulk = self.bulks.popleft()
                if self.paused and len(self.bulks) < LOW_WATER:
                    self._resume()
                self.in_flight += len(bulk)
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                    assert reader is not None
                    body = _encode(Bulk(bulk))
                    writer.write(self.head % len(body) + body)
                    status, keep_alive = await read_response(reader)
                except (OSError, ConnectionError, ValueError, httptools.HttpParserError):
                    status, keep_alive = 0, False
                finally:
                    self.in_flight -= len(bulk)
                self.stats.bulks += 1
                if status == 200:
                    self.stats.forwarded += len(bulk)
                else:
                    self.stats.failed += len(bulk)
                if not keep_alive and writer is not None:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()


class _Response:
    """httptools callbacks for one upstream answer (the body is not needed)."""

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; return (status, keep-alive)."""
    sink = _Response()
    parser = httptools.HttpResponseParser(sink)
    while not sink.done:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("upstream closed the connection")
        parser.feed_data(data)
    return int(parser.get_status_code()), bool(parser.should_keep_alive())


class IntakeProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, answered in order as requests complete."""

    def __init__(self, server: Forwarder) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.auth: bytes | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._answer(400, b'{"success":false}', close=True)

    def on_message_begin(self) -> None:
        self.url = b""
        self.auth = None
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 13 and name.lower() == b"authorization":
            self.auth = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = bool(self.parser.should_keep_alive())
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if method == b"POST":
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            status = self.server.intake(path, body, self.auth)
            if status == 200:
                self._write(OK, keep_alive)
                upstream = self.server.upstream
                if upstream.full() and self.transport is not None:
                    upstream.wait_for_room(self.transport)
            else:
                self._answer(status, b'{"success":false}', close=not keep_alive)
        elif path == b"/health":
            self._answer(200, b'{"status":"ok"}', close=not keep_alive)
        elif path == b"/stats":
            self._answer(200, self.server.stats_json(), close=not keep_alive)
        else:
            self._answer(404, b'{"success":false}', close=not keep_alive)

    def _answer(self, status: int, body: bytes, close: bool) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized",
                  404: b"Not Found"}.get(status, b"Error")
        head = (b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                % (status, reason, len(body)))
        if close:
            head += b"Connection: close\r\n"
        self._write(head + b"\r\n" + body, not close)

    def _write(self, data: bytes, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Forwarder:
    def __init__(self, upstream: str, projects: dict[str, str],
                 connections: int = DEFAULT_CONNECTIONS) -> None:
        self.projects = projects
        self.stats = Stats()
        self.upstream = Upstream(upstream, connections, self.stats)
        self.server: asyncio.Server | None = None

    def intake(self, path: bytes, body: bytes, auth: bytes | None) -> int:
        """Turn one request into commands for the upstream; returns the HTTP status."""
        status, commands = commands_of(path, body, auth, self.projects, time.time())
        if status == 200:
            self.stats.requests += 1
            if commands:
                self.stats.received += len(commands)
                self.upstream.add(commands)
        return status

    def stats_json(self) -> bytes:
        return self.stats.json(self.upstream.pending())

    async def start(self, host: str, port: int) -> int:
        """Listen and start the upstream lanes; returns the port bound."""
        self.upstream.start()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: IntakeProtocol(self), host, port,
                                               reuse_address=True, backlog=1024)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
        await self.upstream.stop()


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def parse_write_key(value: str) -> tuple[str, str]:
    key, sep, project = value.partition("=")
    if not sep or not key or not project:
        raise argparse.ArgumentTypeError(f"expected KEY=PROJECT, got {value!r}")
    return key, project


async def serve(args: argparse.Namespace) -> None:
    forwarder = Forwarder(args.upstream, dict(args.write_key or [("bench", "bench-project")]),
                          args.connections)
    host, port = args.listen
    await forwarder.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"forwarder: listening on {host}:{port}, bulks to {args.upstream}", file=sys.stderr,
          flush=True)
    await stop.wait()
    await forwarder.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forwarder",
                                description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8098),
                   help="host:port (127.0.0.1:8098)")
    p.add_argument("--upstream", required=True, help="Infinario base URL (legacy /bulk)")
    p.add_argument("--write-key", type=parse_write_key, action="append", metavar="KEY=PROJECT",
                   help="a Segment write key and the project its commands go to, repeatable "
                        "(default bench=bench-project, as the load generator sends)")
    p.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                   help=f"keep-alive connections to the upstream ({DEFAULT_CONNECTIONS})")
    args = p.parse_args(argv)
    # Few long-lived objects and many short-lived ones: a young-generation collection every
    # 700 allocations is pure overhead here, and the relay tunes its collector the same way.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
