"""The relay's HTTP/1.1 server over real sockets, and its sans-I/O inflater."""

from __future__ import annotations

import errno
import gzip
import os
import resource
import socket
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import structlog
import trio

from router.errors import Rejected, StartupError
from router.inflate import Inflater, encoding_of
from router.server import (
    Request,
    RequestHead,
    Response,
    Route,
    Server,
    ServerLimits,
    serve,
)

LIMIT = 4096
WAIT = 5.0  # the most any single exchange in these tests may take


@dataclass
class Echo:
    """Answers the body back; /refuse is refused at the head, /boom fails, /slow waits."""

    heads: list[RequestHead] = field(default_factory=list)
    active: int = 0
    most_active: int = 0
    statuses: list[int] = field(default_factory=list)

    def answered(self, status: int, head: RequestHead | None) -> None:
        self.statuses.append(status)

    def route(self, head: RequestHead) -> Route | Response:
        self.heads.append(head)
        if head.path == "/refuse":
            return Response(401, b'{"code":"nope","message":"no"}')
        if head.path == "/boom":
            return Route(LIMIT, self.boom)
        return Route(LIMIT, self.echo)

    async def echo(self, request: Request) -> Response:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        await trio.sleep(0.001 if request.head.path == "/slow" else 0)
        self.active -= 1
        return Response(200, request.body, content_type=b"application/octet-stream",
                        headers=[(b"x-query", request.head.query.encode())])

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("handler bug")


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        assert self.headers[b"content-type"] == b"application/json"
        return msgspec.json.decode(self.body)


class Client:
    """A raw HTTP/1.1 client over one TCP connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        with trio.fail_after(WAIT):
            await self.stream.send_all(data)

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        self.buf += chunk
        return bool(chunk)

    async def head(self) -> bytes:
        with trio.fail_after(WAIT):
            while b"\r\n\r\n" not in self.buf:
                if not await self._fill():
                    raise EOFError(f"closed before a response: {bytes(self.buf)!r}")
        end = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:end])
        del self.buf[:end]
        return head

    async def response(self, *, head_only: bool = False) -> Reply:
        lines = (await self.head()).rstrip(b"\r\n").split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers.get(b"content-length", b"0"))
        with trio.fail_after(WAIT):
            while len(self.buf) < length:
                if not await self._fill():
                    raise EOFError("closed inside a response body")
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return Reply(status, headers, body)

    async def closed(self) -> bool:
        """True once the server closes the connection (EOF or reset) with nothing more sent."""
        with trio.fail_after(WAIT):
            try:
                while await self._fill():
                    pass
            except trio.BrokenResourceError:
                pass
        return not self.buf

    async def aclose(self) -> None:
        await self.stream.aclose()


def post(path: str, body: bytes = b"", *, version: str = "1.1", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


@dataclass
class Running:
    server: Server
    port: int
    handler: Echo

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Client]:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        client = Client(stream)
        try:
            yield client
        finally:
            await client.aclose()


@asynccontextmanager
async def running(handler: Echo | None = None, **limits: Any) -> AsyncIterator[Running]:
    echo = handler or Echo()
    server = Server(echo, ServerLimits(**limits))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve, "127.0.0.1", 0)
        assert url.startswith("http://127.0.0.1:")
        yield Running(server, int(url.rsplit(":", 1)[1]), echo)
        nursery.cancel_scope.cancel()


async def wait_for(predicate: Any, seconds: float = WAIT) -> None:
    """Poll ``predicate`` (server counters have no event to wait on), bounded in time."""
    with trio.fail_after(seconds):
        for _ in range(int(seconds / 0.01) + 1):
            if predicate():
                return
            await trio.sleep(0.01)
    raise AssertionError("condition not reached")


class TestInflater:
    """The inflater keeps the limit while inflating and refuses bad or foreign encodings."""

    def test_gzip_in_small_chunks(self) -> None:
        data = gzip.compress(b"hello " * 100)
        inflater = Inflater("gzip", 1000)
        out = b"".join(inflater.feed(data[i:i + 7]) for i in range(0, len(data), 7))
        assert out + inflater.finish() == b"hello " * 100

    def test_concatenated_members_are_one_body(self) -> None:
        inflater = Inflater("x-gzip", 100)
        out = inflater.feed(gzip.compress(b"one,") + gzip.compress(b"two"))
        assert out + inflater.finish() == b"one,two"

    def test_deflate(self) -> None:
        inflater = Inflater("deflate", 100)
        assert inflater.feed(zlib.compress(b"abc")) + inflater.finish() == b"abc"

    def test_a_bomb_stops_at_the_limit(self) -> None:
        bomb = gzip.compress(b"\0" * 50_000_000)
        inflater = Inflater("gzip", 10_000)
        with pytest.raises(Rejected) as refused:
            inflater.feed(bomb)
        assert refused.value.code == "body_too_large"
        assert refused.value.message == "request body exceeds the 9 KB limit"
        assert inflater.size <= 10_001

    def test_truncated_and_corrupt_are_invalid(self) -> None:
        truncated = Inflater("gzip", 100)
        truncated.feed(gzip.compress(b"abcdef" * 10)[:-8])
        with pytest.raises(Rejected) as refused:
            truncated.finish()
        assert refused.value.code == "invalid_body"
        with pytest.raises(Rejected) as corrupt:
            Inflater("gzip", 100).feed(b"not gzip at all")
        assert corrupt.value.code == "invalid_body"

    @pytest.mark.parametrize("header", [None, b"", b"identity", b" None "])
    def test_identity_needs_no_inflater(self, header: bytes | None) -> None:
        assert encoding_of(header) is None

    def test_unknown_encoding_is_refused(self) -> None:
        with pytest.raises(Rejected) as refused:
            encoding_of(b"br")
        assert refused.value.code == "unsupported_encoding"


class TestKeepAlive:
    """HTTP/1.1 keeps the connection, HTTP/1.0 closes it unless asked, Connection: close
    closes."""

    async def test_http11_keeps_the_connection(self) -> None:
        async with running() as r, r.connect() as c:
            for body in (b"one", b"two"):
                await c.send(post("/x?a=1", body))
                reply = await c.response()
                assert (reply.status, reply.body) == (200, body)
                assert reply.headers[b"x-query"] == b"a=1"
                assert b"connection" not in reply.headers
            assert r.server.statistics().accepted == 1

    async def test_http10_closes_by_default(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(post("/x", b"a", version="1.0"))
            reply = await c.response()
            assert (reply.status, reply.headers[b"connection"]) == (200, b"close")
            assert await c.closed()

    async def test_http10_keep_alive_on_request(self) -> None:
        async with running() as r, r.connect() as c:
            for _ in range(2):
                await c.send(post("/x", b"a", version="1.0", extra="Connection: keep-alive\r\n"))
                reply = await c.response()
                assert reply.headers[b"connection"] == b"keep-alive"
            assert r.handler.heads[0].http_version == "1.0"

    async def test_connection_close_is_answered_then_closed(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(post("/x", b"a", extra="Connection: close\r\n"))
            reply = await c.response()
            assert (reply.status, reply.headers[b"connection"]) == (200, b"close")
            assert await c.closed()


class TestPipelining:
    """Pipelined requests are answered in order, one handler call at a time."""

    async def test_answers_in_order(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"".join(post("/slow", str(i).encode()) for i in range(10)))
            bodies = [(await c.response()).body for _ in range(10)]
            assert bodies == [str(i).encode() for i in range(10)]
            assert r.handler.most_active == 1

    async def test_head_and_body_split_across_sends(self) -> None:
        async with running() as r, r.connect() as c:
            data = post("/x", b"0123456789")
            for i in range(0, len(data), 5):
                await c.send(data[i:i + 5])
                await trio.sleep(0.001)
            assert (await c.response()).body == b"0123456789"


class TestBodies:
    """Bodies by Content-Length or chunked; both at once is refused as smuggling."""

    async def test_chunked(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
            assert (await c.response()).body == b"abcdefg"

    async def test_content_length_and_transfer_encoding_is_400_and_closed(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
            reply = await c.response()
            assert reply.status == 400
            assert reply.json()["code"] == "malformed_request"
            assert reply.headers[b"connection"] == b"close"
            assert await c.closed()
            assert r.handler.heads == []
            assert r.server.statistics().malformed == 1


class TestEncodings:
    """gzip, x-gzip, deflate and identity are inflated; limits hold on the inflated size."""

    @pytest.mark.parametrize(("encoding", "data"), [
        ("gzip", gzip.compress(b"payload")),
        ("x-gzip", gzip.compress(b"pay") + gzip.compress(b"load")),
        ("deflate", zlib.compress(b"payload")),
        ("identity", b"payload"),
        ("none", b"payload"),
    ])
    async def test_inflated(self, encoding: str, data: bytes) -> None:
        async with running() as r, r.connect() as c:
            await c.send(post("/x", data, extra=f"Content-Encoding: {encoding}\r\n"))
            assert (await c.response()).body == b"payload"

    async def test_unsupported_encoding(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(post("/x", b"abc", extra="Content-Encoding: br\r\n"))
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (400, "unsupported_encoding")
            # A short refused body is discarded and the connection serves on.
            await c.send(post("/x", b"next"))
            assert (await c.response()).body == b"next"

    async def test_gzip_bomb_is_too_large(self) -> None:
        bomb = gzip.compress(b"\0" * 5_000_000)
        async with running() as r, r.connect() as c:
            await c.send(post("/x", bomb, extra="Content-Encoding: gzip\r\n"))
            reply = await c.response()
            assert reply.status == 400
            assert reply.json() == {"code": "body_too_large",
                                    "message": "request body exceeds the 4 KB limit"}

    async def test_plain_body_over_the_limit(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % (LIMIT + 1) + b"a" * (LIMIT + 1) + b"\r\n0\r\n\r\n")
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (400, "body_too_large")

    async def test_content_length_over_the_cap_is_refused_before_the_body(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"POST /x HTTP/1.1\r\nContent-Encoding: gzip\r\n"
                         b"Content-Length: %d\r\n\r\n" % (2 * LIMIT + 1))
            reply = await c.response()  # no body byte was sent
            assert (reply.status, reply.json()["code"]) == (400, "body_too_large")

    async def test_invalid_gzip(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(post("/x", gzip.compress(b"abc")[:-6],
                              extra="Content-Encoding: gzip\r\n"))
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (400, "invalid_body")


class TestExpectContinue:
    """100 Continue is sent before a routed body is read; a refusal closes instead."""

    async def test_continue_then_body(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            assert await c.head() == b"HTTP/1.1 100 Continue\r\n\r\n"
            await c.send(b"body")
            assert (await c.response()).body == b"body"

    async def test_refusal_closes(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"POST /refuse HTTP/1.1\r\nContent-Length: 4\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            reply = await c.response()
            assert (reply.status, reply.headers[b"connection"]) == (401, b"close")
            assert await c.closed()


class TestRefusedBodies:
    """A refusal at the head discards a short body and keeps the connection; a long one
    closes."""

    async def test_short_body_is_discarded(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(post("/refuse", b"x" * 1000))
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (401, "nope")
            assert b"connection" not in reply.headers
            await c.send(post("/x", b"again"))
            assert (await c.response()).body == b"again"

    async def test_long_body_closes(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"POST /refuse HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
            reply = await c.response()
            assert (reply.status, reply.headers[b"connection"]) == (401, b"close")
            assert await c.closed()

    async def test_chunked_body_that_never_ends_is_closed_after_the_drain(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("router.server.DRAIN_SECONDS", 0.2)
        async with running() as r, r.connect() as c:
            await c.send(b"POST /refuse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
            assert (await c.response()).status == 401
            assert await c.closed()


class TestMalformed:
    """Malformed heads are 400, oversized ones 431, upgrades 400; each closes."""

    async def test_garbage_request_line(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"HELLO THERE\r\n\r\n")
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (400, "malformed_request")
            assert await c.closed()

    async def test_bad_header(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
            assert (await c.response()).status == 400
            assert await c.closed()

    @pytest.mark.parametrize("split", [False, True])
    async def test_headers_over_the_limit(self, split: bool) -> None:
        async with running(max_header_bytes=1024) as r, r.connect() as c:
            data = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
            if split:  # a value that never ends is cut off too
                await c.send(data[:600])
                await trio.sleep(0.05)
                await c.send(data[600:2000])
            else:
                await c.send(data)
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (431, "headers_too_large")
            assert await c.closed()

    async def test_websocket_upgrade(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (400, "upgrade_not_supported")
            assert await c.closed()

    async def test_log_lines_are_rate_limited(self) -> None:
        async with running() as r:
            with structlog.testing.capture_logs() as logs:
                for _ in range(30):
                    async with r.connect() as c:
                        await c.send(b"NOPE\r\n\r\n")
                        await c.response()
            assert r.server.statistics().malformed == 30
            lines = [e for e in logs if e["event"] == "malformed request"]
            assert 1 <= len(lines) < 30
            assert r.server.statistics().log_lines_suppressed == 30 - len(lines)


class TestTimeouts:
    """Slow heads and bodies get 408 and are closed; idle connections close silently."""

    async def test_header_timeout(self) -> None:
        async with running(header_timeout=0.2) as r, r.connect() as c:
            await c.send(b"POST /x HTTP/1.1\r\nHost: t\r\n")
            reply = await c.response()
            assert (reply.status, reply.json()["code"]) == (408, "request_timeout")
            assert await c.closed()
            assert r.server.statistics().timeouts == 1

    async def test_body_timeout(self) -> None:
        async with running(body_timeout=0.2) as r, r.connect() as c:
            await c.send(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            assert (await c.response()).status == 408
            assert await c.closed()

    async def test_idle_timeout_closes_silently(self) -> None:
        async with running(idle_timeout=0.2) as r, r.connect() as c:
            await c.send(post("/x", b"a"))
            await c.response()
            start = trio.current_time()
            assert await c.closed()
            assert trio.current_time() - start < 2.0

    async def test_client_eof_releases_the_connection_at_once(self) -> None:
        async with running() as r:
            async with r.connect() as c:
                await c.send(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
                await wait_for(lambda: r.handler.heads)
                assert r.server.statistics().open_connections == 1
            await wait_for(lambda: r.server.statistics().open_connections == 0, 1.0)

    async def test_a_client_that_does_not_read_is_dropped(self) -> None:
        big = Echo()

        async def huge(request: Request) -> Response:
            return Response(200, b"x" * 50_000_000)

        big.route = lambda head: Route(LIMIT, huge)  # type: ignore[method-assign]
        async with running(big, write_timeout=0.3) as r, r.connect() as c:
            await c.send(post("/x"))
            await wait_for(lambda: r.server.statistics().timeouts == 1)
            await wait_for(lambda: r.server.statistics().open_connections == 0)


class TestConnectionCap:
    """Past max_connections a connection gets a 503 with Retry-After and is closed."""

    async def test_refused_at_the_cap(self) -> None:
        async with running(max_connections=1) as r, r.connect() as first:
            await first.send(post("/x", b"a"))
            await first.response()
            async with r.connect() as second:
                await second.send(post("/x", b"b"))
                reply = await second.response()
                assert reply.status == 503
                assert reply.headers[b"retry-after"] == b"1"
                assert reply.headers[b"connection"] == b"close"
                assert await second.closed()
            assert r.server.statistics().refused_at_cap == 1
            await first.send(post("/x", b"c"))
            assert (await first.response()).body == b"c"


def _lowest_free_fd() -> int:
    """The descriptor the next open() gets: a limit at it makes the next one fail."""
    fd = os.dup(0)
    os.close(fd)
    return fd


class TestDescriptorExhaustion:
    """Running out of descriptors on accept neither crashes nor floods the log."""

    async def test_backs_off_and_recovers(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        async with running() as r:
            with structlog.testing.capture_logs() as logs:
                waiting = socket.create_connection(("127.0.0.1", r.port))
                try:
                    waiting.sendall(post("/x", b"late"))
                    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
                    try:
                        await wait_for(lambda: r.server.statistics().accept_errors >= 3)
                    finally:
                        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                    with trio.fail_after(WAIT):
                        answer = await trio.socket.from_stdlib_socket(waiting).recv(4096)
                    assert answer.startswith(b"HTTP/1.1 200 OK")
                finally:
                    waiting.close()
            errors = [e for e in logs if e["log_level"] == "error"]
            assert len(errors) == 1
            assert "open-files limit" in errors[0]["event"]


class TestHandlerErrors:
    """A failing handler gets a 500 internal_error and the server keeps serving."""

    async def test_500_then_serves_on(self) -> None:
        async with running() as r, r.connect() as c:
            with structlog.testing.capture_logs() as logs:
                for _ in range(20):
                    await c.send(post("/boom", b"x"))
                    reply = await c.response()
                    assert (reply.status, reply.json()["code"]) == (500, "internal_error")
            await c.send(post("/x", b"fine"))
            assert (await c.response()).body == b"fine"
            assert r.server.statistics().handler_errors == 20
            assert 1 <= len(logs) < 20

    async def test_route_raising_is_500(self) -> None:
        broken = Echo()

        def route(head: RequestHead) -> Route | Response:
            raise KeyError("no")

        broken.route = route  # type: ignore[method-assign]
        async with running(broken) as r, r.connect() as c:
            await c.send(post("/x", b"x"))
            assert (await c.response()).status == 500


class TestHead:
    """HEAD answers carry the Content-Length of the body but not the body."""

    async def test_head(self) -> None:
        async with running() as r, r.connect() as c:
            await c.send(b"HEAD /refuse HTTP/1.1\r\nHost: t\r\n\r\n")
            reply = await c.response(head_only=True)
            assert reply.headers[b"content-length"] == b"30"
            await c.send(post("/x", b"after"))
            assert (await c.response()).body == b"after"


class TestListening:
    """Binding errors are one StartupError line; cancelling stops and closes everything."""

    async def test_busy_port(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(StartupError) as failed:
                await serve(Echo(), "127.0.0.1", port)
        assert str(failed.value) == (f"listen: 127.0.0.1:{port} is already in use; stop the "
                                     "other process or choose another --listen")

    async def test_foreign_address(self) -> None:
        with pytest.raises(StartupError) as failed:
            await serve(Echo(), "192.0.2.1", 0)
        assert "\n" not in str(failed.value)
        assert str(failed.value).startswith("listen: 192.0.2.1:0 ")

    async def test_cancel_closes_connections(self) -> None:
        server = Server(Echo())
        async with trio.open_nursery() as nursery:
            url = await nursery.start(server.serve, "127.0.0.1", 0)
            port = int(url.rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            client = Client(stream)
            await client.send(post("/x", b"a"))
            await client.response()
            nursery.cancel_scope.cancel()
        assert await client.closed()
        await client.aclose()
        with pytest.raises(OSError) as refused:
            await trio.open_tcp_stream("127.0.0.1", port)
        assert refused.value.errno in (errno.ECONNREFUSED, None)
