"""The relay's own HTTP/1.1 transport for httpx: pooled trio sockets, httptools parsing.

The relay posts small bulk requests to one host from a handful of lanes, and
httpx's default transport spent several times the CPU of the request itself on
generality the relay never uses (HTTP/2, streaming, trace hooks). This one does
only what posting to Infinario needs:

- HTTP/1.1 with keep-alive over ``trio.open_tcp_stream``, an idle pool per
  (scheme, host, port) and at most ``max_connections`` open in total;
- TLS with certificate verification, HTTP proxies (absolute-form requests for
  ``http://`` targets, a ``CONNECT`` tunnel for ``https://`` ones);
- request bodies sent whole and responses read whole (Infinario answers with
  small JSON documents);
- httpx's timeouts and exceptions, so callers treat it like any other transport.
"""

from __future__ import annotations

import base64
import math
import select
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass

import httptools
import httpx
import trio

_Key = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}
_RECEIVE = 65536
_MAX_HEAD = 65536  # the most bytes of a CONNECT answer's head we read
_NO_BODY_STATUS = frozenset({204, 304})


class _Stale(Exception):
    """A reused connection failed before any response byte: retry on a fresh one."""

    def __init__(self, error: httpx.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


class _Connection:
    __slots__ = ("expires", "reused", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.stream = stream
        # Closing the socket itself is synchronous, so a connection can be
        # closed from any state, cancelled or not, without awaiting anything.
        self.socket = socket
        self.expires = 0.0
        self.reused = False

    def close(self) -> None:
        self.socket.close()

    def dropped(self) -> bool:
        """True when an idle connection is readable: the server closed it or sent junk."""
        # poll, not select: a busy relay's descriptors run past select's 1024.
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class _Response:
    """httptools' callback target for one response, and what it found."""

    __slots__ = ("body", "complete", "extra", "head_only", "headers", "headers_done",
                 "keep_alive", "parser", "reason", "started", "status", "until_close")

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.started = False  # any byte of the answer arrived
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        # The body runs to the end of the connection (no Content-Length, not chunked).
        self.until_close = False
        self.extra = False  # bytes after the end of the answer

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True
            return
        self.reason = b""
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = status = self.parser.get_status_code()
        if status < 200:
            return  # informational (100 Continue and the like): the real answer follows
        self.headers_done = True
        if self.head_only:
            # llhttp cannot be told the request was HEAD; its answer has no
            # body whatever Content-Length says.
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
            return
        if status in _NO_BODY_STATUS:
            return
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding"
                                              and b"chunked" in value.lower()):
                return
        self.until_close = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200 or self.complete:
            return
        self.complete = True
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A POST target with its request head built (see ``Transport.prepare_post``)."""

    key: _Key
    head: bytes  # request line and headers, ending with "Content-Length: "
    request: httpx.Request  # names the target in errors


class Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over pooled trio sockets, behind httpx's transport interface."""

    def __init__(
        self,
        *,
        max_connections: int = 8,
        proxy: str | httpx.URL | None = None,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = 30.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.proxy: httpx.URL | None = None
        self._proxy_auth: bytes | None = None
        if proxy is not None:
            self.proxy = _proxy_url(proxy)
            if self.proxy.username or self.proxy.password:
                token = f"{self.proxy.username}:{self.proxy.password}".encode()
                self._proxy_auth = b"Basic " + base64.b64encode(token)
        self._ssl_context = ssl_context
        self._alpn_set = False
        self._idle: dict[_Key, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._open = 0  # connection slots taken, connecting or connected
        self._freed = trio.Event()  # set when a slot or an idle connection frees up
        self._closed = False

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # Built on first use: loading the CA bundle is slow and plain-HTTP
            # transports never need it.
            self._ssl_context = httpx.create_ssl_context()
        if not self._alpn_set:
            self._ssl_context.set_alpn_protocols(["http/1.1"])
            self._alpn_set = True
        return self._ssl_context

    # --- requests --------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed; create a new one to send requests")
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"unsupported URL scheme {scheme!r} in {url}; use http or https",
                request=request)
        host = url.host
        key = (scheme, host, url.port or _DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout", {})
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        data = self._head(request, body) + body
        head_only = request.method == "HEAD"

        answer = await self._roundtrip(key, data, head_only, timeouts, request)
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            content=b"".join(answer.body),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason},
        )

    async def _roundtrip(self, key: _Key, data: bytes, head_only: bool,
                         timeouts: dict[str, float | None], request: httpx.Request,
                         ) -> _Response:
        """Send ``data`` on a pooled connection and read the whole answer."""
        conn = await self._acquire(key, timeouts.get("pool"), request)
        try:
            if conn is None:
                conn = await self._connect(key, timeouts.get("connect"), request)
            try:
                answer = await self._exchange(conn, data, head_only, timeouts, request)
            except _Stale as stale:
                conn.close()
                self._all.discard(conn)
                if not conn.reused:
                    raise stale.error from stale.__cause__
                # The server closed the kept-alive connection as we sent on it:
                # nothing of this request was answered, so send it once more on a
                # fresh connection in the same slot.
                conn = await self._connect(key, timeouts.get("connect"), request)
                try:
                    answer = await self._exchange(conn, data, head_only, timeouts, request)
                except _Stale as again:
                    raise again.error from again.__cause__
        except BaseException:
            # Cancelled or failed half-way: the connection may hold half a
            # request or response, so it is never reused.
            if conn is not None:
                conn.close()
                self._all.discard(conn)
            self._release()
            raise
        keep = answer.keep_alive and not answer.until_close and not answer.extra \
            and request.headers.get("connection", "").lower() != "close"
        self._put_back(key, conn, keep)
        return answer

    def prepare_post(self, request: httpx.Request) -> Prepared:
        """A POST to ``request``'s URL with its headers, ready to carry many bodies.

        The relay posts to a handful of URLs all day: building the request line
        and headers once, and skipping httpx's request and response objects,
        saves more CPU per request than the rest of the exchange costs.
        """
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"unsupported URL scheme {url.scheme!r} in {url}; use http or https",
                request=request)
        key = (url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme])
        head = self._head(request, b"").removesuffix(b"\r\n\r\n")
        # Content-Length comes last, per body.
        head = b"\r\n".join(line for line in head.split(b"\r\n")
                             if not line.lower().startswith(b"content-length:"))
        return Prepared(key, head + b"\r\nContent-Length: ", request)

    async def post(self, prepared: Prepared, body: bytes,
                   timeouts: dict[str, float | None]) -> tuple[int, bytes, bytes | None]:
        """POST ``body`` as ``prepared`` says: status, answer body, Retry-After."""
        if self._closed:
            raise RuntimeError("the transport is closed; create a new one to send requests")
        data = b"%s%d\r\n\r\n%s" % (prepared.head, len(body), body)
        answer = await self._roundtrip(prepared.key, data, False, timeouts, prepared.request)
        retry_after = None
        for name, value in answer.headers:
            if name.lower() == b"retry-after":
                retry_after = value
        return answer.status, b"".join(answer.body), retry_after

    def _head(self, request: httpx.Request, body: bytes) -> bytes:
        url = request.url
        if self.proxy is not None and url.scheme == "http":
            # A forward proxy takes the whole URL on the request line.
            target = b"%s://%s%s" % (url.raw_scheme, url.netloc, url.raw_path)
        else:
            target = url.raw_path
        lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), target)]
        has_host = has_length = False
        for name, value in request.headers.raw:
            if b"\n" in value or b"\r" in value:
                # A line break would end the header early and smuggle in another.
                raise httpx.LocalProtocolError(
                    f"header {name.decode('latin-1')} has a line break in its value",
                    request=request)
            lower = name.lower()
            if lower == b"host":
                has_host = True
            elif lower == b"content-length":
                has_length = True
            elif lower == b"transfer-encoding":
                continue  # the body is sent whole, with its length
            lines.append(b"%s: %s" % (name, value))
        if not has_host:
            lines.append(b"Host: %s" % url.netloc)
        if not has_length and (body or request.method in ("POST", "PUT", "PATCH")):
            lines.append(b"Content-Length: %d" % len(body))
        if self._proxy_auth is not None and url.scheme == "http":
            lines.append(b"Proxy-Authorization: %s" % self._proxy_auth)
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    async def _exchange(
        self, conn: _Connection, data: bytes, head_only: bool,
        timeouts: dict[str, float | None], request: httpx.Request,
    ) -> _Response:
        """Send one request and read its whole response."""
        stream = conn.stream
        answer = _Response(head_only)
        answer.parser = parser = httptools.HttpResponseParser(answer)
        write_timeout = _seconds(timeouts.get("write"))
        read_timeout = _seconds(timeouts.get("read"))
        reading = False
        # One cancel scope for the whole exchange, its deadline moved per step:
        # cheaper than a scope per send and receive.
        try:
            with trio.CancelScope(deadline=trio.current_time() + write_timeout) as scope:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise _Stale(httpx.WriteError(
                        f"could not send the request to {request.url.host}: {_why(exc)}",
                        request=request)) from exc
                reading = True
                while not answer.complete:
                    scope.deadline = trio.current_time() + read_timeout
                    try:
                        chunk = await stream.receive_some(_RECEIVE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        error: httpx.TransportError = httpx.ReadError(
                            f"could not read the answer from {request.url.host}: {_why(exc)}",
                            request=request)
                        if answer.started:
                            raise error from exc
                        raise _Stale(error) from exc
                    if not chunk:
                        if answer.until_close and answer.headers_done:
                            answer.complete = True  # the end of the connection ends the body
                            break
                        error = httpx.RemoteProtocolError(
                            f"{request.url.host} closed the connection "
                            + ("in the middle of its answer" if answer.started
                               else "without answering"),
                            request=request)
                        if answer.started:
                            raise error
                        raise _Stale(error)
                    answer.started = True
                    try:
                        parser.feed_data(chunk)
                    except httptools.HttpParserError as exc:
                        if not answer.complete:
                            raise httpx.RemoteProtocolError(
                                f"malformed answer from {request.url.host}: {exc}",
                                request=request) from exc
                        answer.extra = True  # junk after a complete answer
        finally:
            answer.parser = None  # the two refer to each other
        if scope.cancelled_caught:
            if reading:
                raise httpx.ReadTimeout(
                    f"{request.url.host} did not answer within {read_timeout:g}s",
                    request=request)
            raise httpx.WriteTimeout(
                f"could not send the request to {request.url.host} within {write_timeout:g}s",
                request=request)
        return answer

    # --- the pool --------------------------------------------------------------------------

    async def _acquire(
        self, key: _Key, limit: float | None, request: httpx.Request
    ) -> _Connection | None:
        """An idle connection to ``key``, or None with a slot taken for a new one."""
        with trio.move_on_after(_seconds(limit)):
            while True:
                conn = self._take(key)
                if conn is not None:
                    return conn
                if self._open < self.max_connections or self._evict():
                    self._open += 1
                    return None
                await self._freed.wait()
                if self._closed:
                    raise RuntimeError(
                        "the transport was closed while this request waited for a connection")
        raise httpx.PoolTimeout(
            f"no free connection to {request.url.host} within {limit:g}s "
            f"({self.max_connections} in use)", request=request)

    def _take(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if conn.expires > now and not conn.dropped():
                conn.reused = True
                return conn
            self._discard(conn)
        return None

    def _evict(self) -> bool:
        """Close the oldest idle connection to any host, freeing its slot."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].expires < oldest.expires):
                oldest = idle[0]
        if oldest is None:
            return False
        for idle in self._idle.values():
            if idle and idle[0] is oldest:
                idle.pop(0)
                break
        self._discard(oldest)
        return True

    def _discard(self, conn: _Connection) -> None:
        """Close an idle connection and give up its slot."""
        conn.close()
        self._all.discard(conn)
        self._release()

    def _release(self) -> None:
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        self._freed.set()
        self._freed = trio.Event()

    def _put_back(self, key: _Key, conn: _Connection, keep: bool) -> None:
        if keep and not self._closed:
            conn.expires = trio.current_time() + self.keepalive_expiry
            idle = self._idle.get(key)
            if idle is None:
                idle = self._idle[key] = []
            idle.append(conn)
            self._wake()
            return
        conn.close()
        self._all.discard(conn)
        self._release()

    # --- connecting ------------------------------------------------------------------------

    async def _connect(
        self, key: _Key, limit: float | None, request: httpx.Request
    ) -> _Connection:
        if self._closed:
            raise RuntimeError("the transport was closed while this request was sent")
        scheme, host, port = key
        if self.proxy is not None:
            where = f"proxy {self.proxy.host}:{self.proxy.port or 80}"
            address: tuple[str, int] = (self.proxy.host, self.proxy.port or 80)
        else:
            where = f"{host}:{port}"
            address = (host, port)
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(_seconds(limit)):
                tcp = await trio.open_tcp_stream(*address)
                stream: trio.abc.Stream = tcp
                if self.proxy is not None and scheme == "https":
                    await self._tunnel(tcp, host, port, request)
                if scheme == "https":
                    ssl_stream = trio.SSLStream(
                        tcp, self.ssl_context, server_hostname=host, https_compatible=True)
                    await ssl_stream.do_handshake()
                    stream = ssl_stream
        except trio.TooSlowError:
            _close(tcp)
            raise httpx.ConnectTimeout(
                f"could not connect to {where} within {limit:g}s", request=request) from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            _close(tcp)
            raise httpx.ConnectError(
                f"could not connect to {where}: {_why(exc)}", request=request) from exc
        except BaseException:
            _close(tcp)
            raise
        conn = _Connection(stream, tcp.socket)
        self._all.add(conn)
        if self._closed:
            # aclose() ran while this connection was being opened.
            conn.close()
            raise RuntimeError("the transport was closed while this request connected")
        return conn

    async def _tunnel(
        self, tcp: trio.SocketStream, host: str, port: int, request: httpx.Request
    ) -> None:
        """Ask the proxy for a tunnel to host:port (``CONNECT``)."""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1".encode(), f"Host: {authority}".encode()]
        if self._proxy_auth is not None:
            lines.append(b"Proxy-Authorization: " + self._proxy_auth)
        await tcp.send_all(b"\r\n".join([*lines, b"\r\n"]))
        # Read the answer's head only: after a 2xx the tunnel starts right behind it.
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await tcp.receive_some(_RECEIVE)
            if not chunk:
                raise httpx.ProxyError(
                    f"the proxy closed the connection instead of answering CONNECT {authority}",
                    request=request)
            head += chunk
            if len(head) > _MAX_HEAD:
                raise httpx.ProxyError(f"the proxy's answer to CONNECT {authority} is too long",
                                       request=request)
        head, _, rest = head.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise httpx.ProxyError(f"malformed answer from the proxy to CONNECT {authority}: "
                                   f"{status_line[:80]!r}", request=request)
        status = int(parts[1])
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        if not 200 <= status < 300:
            raise httpx.ProxyError(
                f"the proxy refused CONNECT {authority}: {status} {reason}".rstrip(),
                request=request)
        if rest:
            raise httpx.ProxyError(f"the proxy sent data before the tunnel to {authority} "
                                   "was used", request=request)

    # --- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        self._wake()
        await trio.lowlevel.checkpoint()

    @property
    def connections(self) -> int:
        """Connections open now, in use or idle."""
        return len(self._all)


def _seconds(timeout: float | None) -> float:
    return math.inf if timeout is None else timeout


def _why(exc: BaseException) -> str:
    """The most specific reason in an exception chain, for one-line errors."""
    while exc.__cause__ is not None and not str(exc):
        exc = exc.__cause__
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def _close(tcp: trio.SocketStream | None) -> None:
    if tcp is not None:
        tcp.socket.close()


def _proxy_url(proxy: str | httpx.URL) -> httpx.URL:
    text = str(proxy)
    if "://" not in text:
        text = "http://" + text  # HTTP_PROXY=host:port means an HTTP proxy, as curl reads it
    url = httpx.URL(text)
    if url.scheme != "http" or not url.host:
        raise ValueError(f"unsupported proxy {_redacted(url)}; use http://host:port")
    return url


def _redacted(url: httpx.URL) -> str:
    """The URL without its credentials, for error messages."""
    return str(url.copy_with(userinfo=b"")) if url.userinfo else str(url)


def infinario_transport(url: str, *, max_connections: int) -> Transport:
    """The transport to Infinario at ``url``, one connection per lane.

    Honours the standard proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``, ``NO_PROXY``) for the Infinario host, as an HTTP client would.
    """
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        proxy = None
    return Transport(max_connections=max_connections, proxy=proxy or None)
