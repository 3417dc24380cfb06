"""The relay's HTTP/1.1 transport against real servers on 127.0.0.1."""

from __future__ import annotations

import base64
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from router import open_router
from router.simulator import Simulator, run_simulator
from router.transport import Transport, infinario_transport

from .conftest import WRITE_KEY, relay_config

HOST = "127.0.0.1"
TIMEOUT = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


@dataclass
class Request:
    """One request as a test server read it."""

    connection: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


def ok(body: bytes = b"ok", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), head.encode(), body)


# What a server does with a request: bytes to send (then close if ``close``), or
# None to close the connection without answering.
Answer = Callable[[Request], Awaitable[tuple[bytes | None, bool]]]


async def answer_ok(request: Request) -> tuple[bytes | None, bool]:
    return ok(b"answer to " + request.target.encode()), False


class Reader:
    """Reads HTTP/1.1 requests off a stream: head up to the blank line, then Content-Length."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        self.buffer += chunk
        return bool(chunk)

    async def head(self) -> list[str] | None:
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return head.decode("latin-1").split("\r\n")

    async def request(self, connection: int) -> Request | None:
        lines = await self.head()
        if lines is None:
            return None
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"header {name} sent twice"
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not await self._fill():
                return None
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Request(connection, method, target, headers, body)


@dataclass
class Server:
    """A test HTTP/1.1 server: counts connections, records requests, answers with ``answer``."""

    answer: Answer = answer_ok
    url: str = ""
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    closed: int = 0  # connections the client closed (EOF while waiting for a request)
    client_closed: trio.Event = field(default_factory=trio.Event)
    requests: list[Request] = field(default_factory=list)
    alpn: list[str | None] = field(default_factory=list)  # per TLS connection

    async def handle(self, stream: trio.abc.Stream) -> None:
        if isinstance(stream, trio.SSLStream):
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError:
                return  # the client refused the certificate
            self.alpn.append(stream.selected_alpn_protocol())
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        reader = Reader(stream)
        try:
            while True:
                request = await reader.request(number)
                if request is None:
                    self.closed += 1
                    self.client_closed.set()
                    return
                self.requests.append(request)
                data, close = await self.answer(request)
                if data is None:
                    return
                await stream.send_all(data)
                if close:
                    return
        except trio.BrokenResourceError:
            self.closed += 1
        finally:
            self.open_now -= 1
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serving(server: Server, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """Run ``server`` on 127.0.0.1 (with TLS when given a context) until the block ends."""
    async with trio.open_nursery() as nursery:
        if tls is None:
            listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host=HOST))
        else:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, server.handle, 0, tls, host=HOST))
        port = listeners[0].transport_listener.socket.getsockname()[1] if tls \
            else listeners[0].socket.getsockname()[1]
        server.url = f"{'https' if tls else 'http'}://{HOST}:{port}"
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def call(transport: httpx.AsyncBaseTransport, url: str, method: str = "POST",
               body: bytes = b"{}", **timeouts: float) -> httpx.Response:
    request = httpx.Request(method, url, content=body if method != "HEAD" else None,
                            extensions={"timeout": {**TIMEOUT, **timeouts}})
    return await transport.handle_async_request(request)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class TestKeepAlive:
    """Requests to one host share pooled connections, at most ``max_connections`` of them."""

    async def test_sequential_requests_reuse_one_connection(self) -> None:
        async with serving(Server()) as server, Transport() as transport:
            for i in range(5):
                response = await call(transport, f"{server.url}/bulk?n={i}", body=b'{"n":1}')
                assert response.status_code == 200
                assert response.content == f"answer to /bulk?n={i}".encode()
            assert server.connections == 1
            assert [r.body for r in server.requests] == [b'{"n":1}'] * 5
            first = server.requests[0]
            assert first.headers["host"] == server.url.removeprefix("http://")
            assert first.headers["content-length"] == "7"
            assert first.target == "/bulk?n=0"

    async def test_max_connections_under_concurrency(self) -> None:
        async def slow(request: Request) -> tuple[bytes | None, bool]:
            await trio.sleep(0.02)
            return ok(), False

        statuses: list[int] = []
        async with serving(Server(slow)) as server, Transport(max_connections=3) as transport:

            async def one() -> None:
                statuses.append((await call(transport, server.url + "/")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            assert transport.connections == 3
        assert statuses == [200] * 20
        assert server.connections == 3
        assert server.most_open == 3

    async def test_idle_connections_expire(self) -> None:
        async with serving(Server()) as server, Transport(keepalive_expiry=0.05) as transport:
            await call(transport, server.url + "/")
            await trio.sleep(0.1)
            await call(transport, server.url + "/")
            assert server.connections == 2

    async def test_idle_connection_to_another_host_makes_room(self) -> None:
        async with serving(Server()) as a, serving(Server()) as b, \
                Transport(max_connections=1) as transport:
            await call(transport, a.url + "/", pool=0.5)
            await call(transport, b.url + "/", pool=0.5)
            await call(transport, a.url + "/", pool=0.5)
            assert (a.connections, b.connections) == (2, 1)
            assert transport.connections == 1


class TestResponses:
    """Content-Length, chunked and close-delimited bodies; no body for HEAD, 204 and 304."""

    async def test_chunked_body_split_across_sends(self) -> None:
        async def chunked(request: Request) -> tuple[bytes | None, bool]:
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                    b"Content-Type: application/json\r\n\r\n"
                    b"5\r\n{\"a\":\r\n4\r\n [1]\r\n1\r\n}\r\n0\r\n\r\n"), False

        async with serving(Server(chunked)) as server, Transport() as transport:
            for _ in range(2):
                response = await call(transport, server.url + "/")
                assert response.json() == {"a": [1]}
                assert response.headers["content-type"] == "application/json"
            assert server.connections == 1

    async def test_close_delimited_body(self) -> None:
        async def until_close(request: Request) -> tuple[bytes | None, bool]:
            return b"HTTP/1.1 200 OK\r\n\r\nthe whole body", True

        async with serving(Server(until_close)) as server, Transport() as transport:
            for _ in range(2):
                assert (await call(transport, server.url + "/")).content == b"the whole body"
            assert server.connections == 2

    async def test_server_connection_close_is_honoured(self) -> None:
        async def closing(request: Request) -> tuple[bytes | None, bool]:
            return ok(b"bye", "Connection: close"), False  # the server keeps it open

        async with serving(Server(closing)) as server, Transport() as transport:
            for _ in range(2):
                assert (await call(transport, server.url + "/")).content == b"bye"
            assert server.connections == 2
            assert transport.connections == 0

    async def test_head_204_and_304_have_no_body(self) -> None:
        async def bodiless(request: Request) -> tuple[bytes | None, bool]:
            if request.method == "HEAD":
                return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", False
            if request.target == "/204":
                return b"HTTP/1.1 204 No Content\r\n\r\n", False
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n", False

        async with serving(Server(bodiless)) as server, Transport() as transport:
            head = await call(transport, server.url + "/", method="HEAD")
            assert (head.status_code, head.content) == (200, b"")
            assert head.headers["content-length"] == "100"
            assert (await call(transport, server.url + "/204", method="GET")).content == b""
            assert (await call(transport, server.url + "/304", method="GET")).status_code == 304
            assert (await call(transport, server.url + "/204", method="GET")).status_code == 204
            assert server.connections == 1

    async def test_informational_answer_is_skipped(self) -> None:
        async def continued(request: Request) -> tuple[bytes | None, bool]:
            return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"), False

        async with serving(Server(continued)) as server, Transport() as transport:
            response = await call(transport, server.url + "/")
            assert (response.status_code, response.content) == (200, b"final")

    async def test_malformed_answer(self) -> None:
        async def garbage(request: Request) -> tuple[bytes | None, bool]:
            return b"this is not http\r\n\r\n", False

        async with serving(Server(garbage)) as server, Transport() as transport:
            with pytest.raises(httpx.RemoteProtocolError, match="malformed answer"):
                await call(transport, server.url + "/")
            assert transport.connections == 0


class TestStaleConnections:
    """A kept-alive connection the server dropped is retried once; a partial answer never is."""

    async def test_dropped_while_sending_is_retried_on_a_fresh_connection(self) -> None:
        async def drop_second(request: Request) -> tuple[bytes | None, bool]:
            if request.connection == 1 and len(server.requests) == 2:
                return None, True  # read the request, then close without answering
            return ok(), False

        server = Server(drop_second)
        async with serving(server), Transport() as transport:
            assert (await call(transport, server.url + "/")).status_code == 200
            assert (await call(transport, server.url + "/")).status_code == 200
            assert server.connections == 2
            assert [r.connection for r in server.requests] == [1, 1, 2]

    async def test_closed_after_answering_is_not_used_again(self) -> None:
        async def answer_and_close(request: Request) -> tuple[bytes | None, bool]:
            return ok(), True  # no Connection: close header, just closes

        async with serving(Server(answer_and_close)) as server, Transport() as transport:
            for _ in range(3):
                await trio.sleep(0.01)
                assert (await call(transport, server.url + "/")).status_code == 200
            assert server.connections == 3

    async def test_fresh_connection_closed_without_answer_is_not_retried(self) -> None:
        async def drop(request: Request) -> tuple[bytes | None, bool]:
            return None, True

        async with serving(Server(drop)) as server, Transport() as transport:
            with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
                await call(transport, server.url + "/")
            assert len(server.requests) == 1

    async def test_partial_answer_is_not_retried(self) -> None:
        async def truncate_second(request: Request) -> tuple[bytes | None, bool]:
            if len(server.requests) == 2:
                return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True
            return ok(), False

        server = Server(truncate_second)
        async with serving(server), Transport() as transport:
            await call(transport, server.url + "/")
            with pytest.raises(httpx.RemoteProtocolError, match="in the middle of its answer"):
                await call(transport, server.url + "/")
            assert len(server.requests) == 2
            assert server.connections == 1
            assert transport.connections == 0


class TestTimeoutsAndErrors:
    """Each timeout and failure surfaces as httpx's own exception."""

    async def test_read_timeout(self) -> None:
        async def silent(request: Request) -> tuple[bytes | None, bool]:
            await trio.sleep_forever()
            raise AssertionError

        async with serving(Server(silent)) as server, Transport() as transport:
            with pytest.raises(httpx.ReadTimeout):
                await call(transport, server.url + "/", read=0.1)
            assert transport.connections == 0

    async def test_write_timeout(self) -> None:
        started = trio.Event()

        async def never_reads(stream: trio.SocketStream) -> None:
            started.set()
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, never_reads, 0, host=HOST))
            port = listeners[0].socket.getsockname()[1]
            async with Transport() as transport:
                with pytest.raises(httpx.WriteTimeout):
                    await call(transport, f"http://{HOST}:{port}/", body=b"x" * 64_000_000,
                               write=0.2)
            nursery.cancel_scope.cancel()
        assert started.is_set()

    async def test_connect_timeout_covers_the_tls_handshake(
            self, client_tls: ssl.SSLContext) -> None:
        async def mute(stream: trio.SocketStream) -> None:
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, mute, 0, host=HOST))
            port = listeners[0].socket.getsockname()[1]
            async with Transport(ssl_context=client_tls) as transport:
                with pytest.raises(httpx.ConnectTimeout, match=r"within 0\.1s"):
                    await call(transport, f"https://{HOST}:{port}/", connect=0.1)
                assert transport.connections == 0
            nursery.cancel_scope.cancel()

    async def test_pool_timeout(self) -> None:
        release = trio.Event()

        async def held(request: Request) -> tuple[bytes | None, bool]:
            await release.wait()
            return ok(), False

        async with serving(Server(held)) as server, Transport(max_connections=1) as transport:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, transport, server.url + "/")
                await trio.sleep(0.05)
                with pytest.raises(httpx.PoolTimeout, match="1 in use"):
                    await call(transport, server.url + "/", pool=0.1)
                release.set()
            assert (await call(transport, server.url + "/", pool=0.1)).status_code == 200
            assert server.connections == 1

    async def test_connection_refused(self) -> None:
        with trio.socket.socket() as sock:
            await sock.bind((HOST, 0))
            port = sock.getsockname()[1]  # bound, never listening: connecting is refused
            async with Transport() as transport:
                with pytest.raises(httpx.ConnectError, match=f"{HOST}:{port}"):
                    await call(transport, f"http://{HOST}:{port}/")
                assert transport.connections == 0
                # The slot was given back.
                with pytest.raises(httpx.ConnectError):
                    await call(transport, f"http://{HOST}:{port}/", pool=0.1)

    async def test_reset_connection_is_a_read_error(self) -> None:
        async def reset(stream: trio.SocketStream) -> None:
            if await Reader(stream).request(1) is not None:
                # Linger 0: closing sends a reset instead of a clean end.
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
            stream.socket.close()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, reset, 0, host=HOST))
            port = listeners[0].socket.getsockname()[1]
            async with Transport() as transport:
                with pytest.raises(httpx.ReadError, match="could not read the answer"):
                    await call(transport, f"http://{HOST}:{port}/")
                assert transport.connections == 0
            nursery.cancel_scope.cancel()

    async def test_line_break_in_a_header_is_refused(self) -> None:
        async with serving(Server()) as server, Transport() as transport:
            request = httpx.Request("POST", server.url, headers={"x-token": "a\r\nEvil: 1"},
                                    content=b"{}")
            with pytest.raises(httpx.LocalProtocolError, match="x-token"):
                await transport.handle_async_request(request)
            assert server.requests == []

    async def test_unsupported_scheme(self) -> None:
        async with Transport() as transport:
            with pytest.raises(httpx.UnsupportedProtocol, match="use http or https"):
                await call(transport, "ftp://127.0.0.1/")


class TestCancellation:
    """A cancelled request closes its connection instead of pooling it half-used."""

    async def test_cancelled_request_closes_its_connection(self) -> None:
        async def slow_second(request: Request) -> tuple[bytes | None, bool]:
            if len(server.requests) == 2:
                await trio.sleep(0.5)
            return ok(), False

        server = Server(slow_second)
        async with serving(server), Transport() as transport:
            await call(transport, server.url + "/")
            with trio.move_on_after(0.05) as scope:
                await call(transport, server.url + "/")
            assert scope.cancelled_caught
            assert transport.connections == 0
            assert (await call(transport, server.url + "/", pool=0.1)).status_code == 200
            assert server.connections == 2

    async def test_closed_transport_refuses_requests(self) -> None:
        async with serving(Server()) as server:
            transport = Transport()
            await call(transport, server.url + "/")
            await transport.aclose()
            assert transport.connections == 0
            with pytest.raises(RuntimeError, match="transport is closed"):
                await call(transport, server.url + "/")
            with trio.fail_after(5):
                await server.client_closed.wait()


class TestTLS:
    """https verifies the server's certificate against the trusted CAs."""

    async def test_trusted_certificate(
            self, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
        async with serving(Server(), tls=server_tls) as server, \
                Transport(ssl_context=client_tls) as transport:
            for _ in range(3):
                response = await call(transport, server.url + "/secure")
                assert response.content == b"answer to /secure"
            assert server.connections == 1
            assert server.alpn == ["http/1.1"]

    async def test_untrusted_certificate_fails_to_connect(
            self, server_tls: ssl.SSLContext) -> None:
        async with serving(Server(), tls=server_tls) as server, Transport() as transport:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await call(transport, server.url + "/")
            assert transport.connections == 0


@dataclass
class Tunnels:
    """A CONNECT proxy that relays bytes to the requested host, recording each CONNECT."""

    refuse: bytes | None = None
    connects: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def handle(self, client: trio.SocketStream) -> None:
        reader = Reader(client)
        lines = await reader.head()
        if lines is None:
            return
        method, authority, _ = lines[0].split(" ", 2)
        assert method == "CONNECT"
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        self.connects.append((authority, headers))
        if self.refuse is not None:
            await client.send_all(self.refuse)
            await client.aclose()
            return
        host, _, port = authority.rpartition(":")
        upstream = await trio.open_tcp_stream(host, int(port))
        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(sink)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, upstream)
            nursery.start_soon(pipe, upstream, client)


@asynccontextmanager
async def proxying(handler: Callable[[trio.SocketStream], Awaitable[Any]]) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
        try:
            yield f"http://user:s3cret@{HOST}:{listeners[0].socket.getsockname()[1]}"
        finally:
            nursery.cancel_scope.cancel()


BASIC = "Basic " + base64.b64encode(b"user:s3cret").decode()


class TestProxies:
    """http targets go through a proxy in absolute form, https ones through a CONNECT tunnel."""

    async def test_http_target_uses_absolute_form_and_proxy_credentials(self) -> None:
        proxy = Server()
        async with serving(proxy):
            credentials = proxy.url.replace("http://", "http://user:s3cret@")
            async with Transport(proxy=credentials) as transport:
                for _ in range(2):
                    response = await call(transport, "http://infinario.test:8080/bulk?x=1")
                    assert response.content == b"answer to http://infinario.test:8080/bulk?x=1"
        assert proxy.connections == 1
        request = proxy.requests[0]
        assert request.target == "http://infinario.test:8080/bulk?x=1"
        assert request.headers["host"] == "infinario.test:8080"
        assert request.headers["proxy-authorization"] == BASIC

    async def test_https_target_tunnels_then_speaks_tls(
            self, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
        tunnels = Tunnels()
        async with serving(Server(), tls=server_tls) as server, \
                proxying(tunnels.handle) as proxy_url, \
                Transport(proxy=proxy_url, ssl_context=client_tls) as transport:
            for _ in range(2):
                response = await call(transport, server.url + "/bulk")
                assert response.content == b"answer to /bulk"
            assert server.connections == 1
            # The request inside the tunnel is in origin form, without the proxy's credentials.
            assert server.requests[0].target == "/bulk"
            assert "proxy-authorization" not in server.requests[0].headers
        authority = server.url.removeprefix("https://")
        assert [(a, h["host"], h["proxy-authorization"]) for a, h in tunnels.connects] == [
            (authority, authority, BASIC)]

    async def test_refused_connect_is_a_proxy_error(self, client_tls: ssl.SSLContext) -> None:
        tunnels = Tunnels(refuse=b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                 b"Content-Length: 0\r\n\r\n")
        async with proxying(tunnels.handle) as proxy_url, \
                Transport(proxy=proxy_url, ssl_context=client_tls) as transport:
            with pytest.raises(httpx.ProxyError, match="407 Proxy Authentication") as caught:
                await call(transport, "https://infinario.test/bulk")
            assert "s3cret" not in str(caught.value)
            assert transport.connections == 0

    async def test_unsupported_proxy_scheme(self) -> None:
        with pytest.raises(ValueError, match="unsupported proxy socks5://127") as caught:
            Transport(proxy="socks5://u:pw@127.0.0.1:1080")
        assert "pw" not in str(caught.value)


class TestThroughClient:
    """An httpx.AsyncClient drives the transport like any other."""

    async def test_client_requests(self) -> None:
        async def echo(request: Request) -> tuple[bytes | None, bool]:
            body = b'{"method":"%s","got":%s}' % (request.method.encode(), request.body or b"0")
            return ok(body, "Content-Type: application/json"), False

        async with serving(Server(echo)) as server, httpx.AsyncClient(
                transport=Transport(max_connections=2), base_url=server.url,
                timeout=5.0) as client:
            posted = await client.post("/bulk", json={"commands": [1, 2]})
            assert posted.json() == {"method": "POST", "got": {"commands": [1, 2]}}
            got = await client.get("/", params={"q": "1"})
            assert got.json() == {"method": "GET", "got": 0}
            assert got.http_version == "HTTP/1.1"
            assert server.requests[1].target == "/?q=1"
            assert server.connections == 1

    async def test_client_sees_timeouts_as_http_errors(self) -> None:
        async def silent(request: Request) -> tuple[bytes | None, bool]:
            await trio.sleep_forever()
            raise AssertionError

        async with serving(Server(silent)) as server, httpx.AsyncClient(
                transport=Transport(), timeout=httpx.Timeout(5.0, read=0.1)) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(server.url + "/")


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # urllib ignores HTTP_PROXY under CGI


@pytest.mark.usefixtures("no_proxy_variables")
class TestProxySelection:
    """infinario_transport picks the proxy from the environment as HTTP clients do."""

    def test_no_variables_no_proxy(self) -> None:
        transport = infinario_transport("https://api.infinario.com", max_connections=4)
        assert transport.proxy is None
        assert transport.max_connections == 4

    def test_scheme_specific_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
        monkeypatch.setenv("HTTP_PROXY", "http://plain.corp:3128")
        transport = infinario_transport("https://api.infinario.com", max_connections=8)
        assert str(transport.proxy) == "http://proxy.corp:3128"
        plain = infinario_transport("http://api.infinario.com", max_connections=8)
        assert str(plain.proxy) == "http://plain.corp:3128"

    def test_all_proxy_is_the_fallback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ALL_PROXY", "http://all.corp:8080")
        transport = infinario_transport("https://api.infinario.com", max_connections=8)
        assert str(transport.proxy) == "http://all.corp:8080"

    def test_no_proxy_bypasses(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
        monkeypatch.setenv("NO_PROXY", "localhost,.infinario.com")
        assert infinario_transport("https://api.infinario.com", max_connections=8).proxy is None
        other = infinario_transport("https://api.exponea.com", max_connections=8)
        assert other.proxy is not None

    def test_credentials_become_proxy_authorization(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HTTPS_PROXY", "http://user:s3cret@proxy.corp:3128")
        transport = infinario_transport("https://api.infinario.com", max_connections=8)
        assert transport.proxy is not None and transport.proxy.host == "proxy.corp"
        assert transport._proxy_auth == BASIC.encode()


@pytest.mark.usefixtures("no_proxy_variables")
class TestWithRelay:
    """The relay delivers to the simulator through this transport, wired as the app will be."""

    async def test_relay_delivers_through_the_transport(self, tmp_path: Path) -> None:
        sim = Simulator()
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_simulator, sim, HOST, 0)
            config = relay_config(tmp_path / "data", infinario_url=url, concurrency=2)
            transport = infinario_transport(url, max_connections=config.concurrency)
            async with transport, open_router(config, http=True, transport=transport) as router:
                batch = [{"type": "track", "event": f"Event {i}", "userId": f"u{i % 3}",
                          "messageId": f"m{i}"} for i in range(120)]
                assert router.url is not None
                async with httpx.AsyncClient(transport=Transport(), timeout=5.0) as client:
                    answer = await client.post(f"{router.url}/v1/batch", json={"batch": batch},
                                               auth=(WRITE_KEY, ""))
                    assert answer.status_code == 200, answer.text
                with trio.fail_after(10):
                    await router.drain()
                assert 1 <= transport.connections <= 2
            nursery.cancel_scope.cancel()
        assert sorted(e["type"] for e in sim.events) == sorted(f"Event {i}" for i in range(120))
        assert {r["status"] for r in sim.requests} == {200}
