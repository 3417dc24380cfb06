"""The relay's own HTTP/1.1 server: trio sockets, httptools (llhttp) parsing.

One task per connection reads, parses, hands each complete request to its
handler and writes the answer; it is the only writer of its socket, so
pipelined requests are answered in order, one at a time. The handler sees the
head first (``Handler.route``) and either answers at once (the body is then
discarded or the connection closed) or names the body limit and the coroutine
that handles the request once its body is read. Bodies are inflated and
limit-checked as they arrive, inside the parser's callbacks.

Everything a client can do wrong ends in a JSON ``{"code", "message"}`` answer
or a closed socket, never in a hang: every wait has a deadline (headers, body,
idle keep-alive, writes), and past ``max_connections`` a new connection gets a
canned 503 and is closed.
"""

from __future__ import annotations

import errno
import math
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol
from urllib.parse import unquote

import httptools
import msgspec
import structlog
import trio

from .errors import Rejected, StartupError
from .inflate import Inflater, encoding_of, raw_limit, too_large

log = structlog.get_logger("router.server")

RECV_BYTES = 65536
# A refused request's unread body is discarded up to this much (and this long)
# so the connection can serve the next request; past it the connection closes.
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 5.0
# After answering and deciding to close, what is still arriving is read and
# dropped for this long (or this much) so the answer is not lost to a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 8 * 1024 * 1024
# How long a connection refused at the cap may take to get its 503.
REFUSE_SECONDS = 1.0
# Out of descriptors: accepting again at once would spin.
ACCEPT_BACKOFF = 0.1
ACCEPT_LOG_EVERY = 5.0
# Log lines a second for malformed requests and handler failures; the rest are counted.
LOG_LINES_PER_SECOND = 5
BACKLOG = 1024

_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The peer gave up between the kernel's accept queue and our accept().
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                    "OPTIONS", "TRACE", "CONNECT")}
_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class RequestHead:
    method: str
    path: str  # without the query string, percent-decoded
    query: str  # raw query string, "" when none
    headers: dict[bytes, bytes]  # names lower-cased; a repeated header keeps the last value
    http_version: str  # "1.1" or "1.0"


@dataclass(slots=True)
class Request:
    head: RequestHead
    body: bytes  # inflated and limit-checked
    received_at: float  # trio.current_time() when the headers were complete


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    close: bool = False  # send Connection: close and close after writing


@dataclass(slots=True)
class Route:
    limit: int  # most body bytes after inflating
    call: Callable[[Request], Awaitable[Response]]


class Handler(Protocol):
    def route(self, head: RequestHead) -> Route | Response:
        """Called when the headers are complete. A Response is sent at once without
        reading the body; a Route says how much body to read and who handles it."""

    def answered(self, status: int, head: RequestHead | None) -> None:
        """Called for every answer sent, the server's own errors included (metrics).

        ``head`` is the request's, or None when the request was refused before its
        head was complete (malformed, headers too large or too slow)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    max_connections: int = 1024
    max_header_bytes: int = 16384
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    write_timeout: float = 30.0
    # Reading never overlaps handling, so requests parsed ahead of the one being
    # handled come from one receive at most; past this many the rest of that
    # receive is still answered, but nothing more is read until all are.
    max_pipelined: int = 16


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    open_connections: int
    accepted: int  # connections served (not counting those refused at the cap)
    refused_at_cap: int
    timeouts: int  # header, body, write timeouts and idle keep-alive closes
    malformed: int  # requests answered 400/431 before reaching the handler
    handler_errors: int  # route() or Route.call raised
    accept_errors: int  # accept() failed for want of descriptors or memory
    log_lines_suppressed: int


def error(status: int, code: str, message: str, *, close: bool = False,
          headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    """A JSON error answer in the intake's shape."""
    return Response(status, _encode({"code": code, "message": message}),
                    headers=headers or [], close=close)


def _rejected(exc: Rejected, close: bool) -> Response:
    return error(exc.status, exc.code, exc.message, close=close)


_INTERNAL_ERROR = error(500, "internal_error", "the server failed to handle this request")
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode()
    return line


def render(response: Response, keep: bool, head_only: bool = False,
           http10: bool = False) -> bytes:
    """The bytes of one answer, written with one send."""
    body = response.body
    parts = [_status_line(response.status)]
    if response.content_type:
        parts += (b"content-type: ", response.content_type, b"\r\n")
    parts += (b"content-length: ", b"%d" % len(body), b"\r\n")
    for name, value in response.headers:
        parts += (name, b": ", value, b"\r\n")
    if not keep:
        parts.append(b"connection: close\r\n")
    elif http10:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


_REFUSED = render(error(503, "overloaded", "too many open connections; retry",
                        headers=[(b"retry-after", b"1")]), keep=False)


class _LogLimit:
    """Allows a few log lines a second across the server and counts the rest."""

    __slots__ = ("lines", "per_second", "suppressed", "total_suppressed", "window")

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.window = 0.0
        self.lines = 0
        self.suppressed = 0
        self.total_suppressed = 0

    def allow(self) -> int | None:
        """None to stay silent; else how many lines were suppressed since the last one."""
        now = time.monotonic()
        if now - self.window >= 1.0:
            self.window = now
            self.lines = 0
        if self.lines >= self.per_second:
            self.suppressed += 1
            self.total_suppressed += 1
            return None
        self.lines += 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class _Abort(Exception):
    """Raised inside a parser callback: answer ``response`` and close."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


# (request or None for an answer made without the handler, what answers it,
#  keep the connection, HEAD, HTTP/1.0)
# (request, route or answer, keep-alive, HEAD, HTTP/1.0, the head when known)
_Entry = tuple[Request | None, Route | Response, bool, bool, bool, RequestHead | None]


class Server:
    """Serves one Handler; ``statistics()`` can be read while it runs."""

    def __init__(self, handler: Handler, limits: ServerLimits = ServerLimits()) -> None:
        self.handler = handler
        self.limits = limits
        self.open_connections = 0
        self.accepted = 0
        self.refused_at_cap = 0
        self.timeouts = 0
        self.malformed = 0
        self.handler_errors = 0
        self.accept_errors = 0
        self._logs = _LogLimit(LOG_LINES_PER_SECOND)
        self._accept_logged = -math.inf

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            open_connections=self.open_connections, accepted=self.accepted,
            refused_at_cap=self.refused_at_cap, timeouts=self.timeouts,
            malformed=self.malformed, handler_errors=self.handler_errors,
            accept_errors=self.accept_errors,
            log_lines_suppressed=self._logs.total_suppressed)

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status`` gets the bound base URL."""
        listener = await _listen(host, port)
        try:
            bound = listener.getsockname()
            shown = f"[{bound[0]}]" if listener.family == socket.AF_INET6 else bound[0]
            async with trio.open_nursery() as nursery:
                task_status.started(f"http://{shown}:{bound[1]}")
                await self._accept(listener, nursery)
        finally:
            listener.close()

    async def _accept(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        limits = self.limits
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:  # everything queued, one wakeup
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _EXHAUSTED:
                        self._accept_failed(exc)
                        await trio.sleep(ACCEPT_BACKOFF)
                        break
                    if exc.errno in _ACCEPT_TRANSIENT:
                        continue
                    raise
                sock.setblocking(False)
                if self.open_connections >= limits.max_connections:
                    self.refused_at_cap += 1
                    nursery.start_soon(_refuse, sock)
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.open_connections += 1
                self.accepted += 1
                nursery.start_soon(self._connection, sock)

    def _accept_failed(self, exc: OSError) -> None:
        self.accept_errors += 1
        now = time.monotonic()
        if now - self._accept_logged >= ACCEPT_LOG_EVERY:
            self._accept_logged = now
            log.error("cannot accept connections; raise the open-files limit (ulimit -n) "
                      "or lower max_connections", error=exc.strerror,
                      failures=self.accept_errors)

    async def _connection(self, sock: socket.socket) -> None:
        try:
            connection = _Connection(self, sock)
            await connection.run()
            if connection.closing:
                await _linger(sock)
        except OSError:
            pass  # reset or gone: nothing to answer
        finally:
            self.open_connections -= 1
            sock.close()

    def log_malformed(self, reason: str) -> None:
        self.malformed += 1
        suppressed = self._logs.allow()
        if suppressed is not None:
            log.info("malformed request", reason=reason, suppressed=suppressed)

    def log_handler_error(self, path: str) -> None:
        self.handler_errors += 1
        suppressed = self._logs.allow()
        if suppressed is not None:
            log.error("request handler failed", path=path, suppressed=suppressed,
                      exc_info=True)


async def serve(handler: Handler, host: str, port: int, *,
                limits: ServerLimits = ServerLimits(),
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen and serve until cancelled; task_status.started(url) gets the bound base URL,
    e.g. http://127.0.0.1:43121 (port 0 picks a free port)."""
    await Server(handler, limits).serve(host, port, task_status=task_status)


async def _listen(host: str, port: int) -> socket.socket:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                              flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"listen: cannot resolve {host!r} ({exc.strerror}); "
                           "use an IP address or a known host name") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"listen: {where} is already in use; stop the other process "
                               "or choose another --listen") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"listen: {where} is not an address of this machine; "
                               "choose another --listen") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"listen: no permission to listen on {where}; "
                               "use a port above 1023") from None
        raise StartupError(f"listen: cannot listen on {where}: {exc.strerror}") from None
    return sock


async def _linger(sock: socket.socket) -> None:
    """Close gently after an answer the client may still be sending a body to.

    Closing a socket with unread data makes the kernel send a reset, which can
    destroy the answer before the client reads it. So: end our side, then read
    and discard what is still coming for a short while, then close.
    """
    sock.shutdown(socket.SHUT_WR)
    discarded = 0
    with trio.move_on_after(LINGER_SECONDS):
        while discarded <= LINGER_BYTES:
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                return
            discarded += len(data)
            await trio.lowlevel.checkpoint()


async def _refuse(sock: socket.socket) -> None:
    """The canned 503 for a connection past the cap, then close (never a hang)."""
    try:
        with trio.move_on_after(REFUSE_SECONDS):
            # A new connection's send buffer is empty: this cannot block.
            sock.send(_REFUSED)
            sock.shutdown(socket.SHUT_WR)
            # Reading until the client closes keeps an unread request from turning
            # our close into a reset that would discard the 503 on its side.
            while True:
                await trio.lowlevel.wait_readable(sock)
                if not sock.recv(RECV_BYTES):
                    break
    except OSError:
        pass
    finally:
        sock.close()


class _Connection:
    """One client connection: the httptools protocol (callbacks) and its serving loop."""

    __slots__ = (
        "body_deadline",
        "body_seen",
        "closing",
        "discarded",
        "drain_deadline",
        "expect_continue",
        "fed",
        "handler",
        "head",
        "head_bytes",
        "head_mark",
        "head_only",
        "head_started",
        "headers",
        "http10",
        "in_body",
        "in_head",
        "inflater",
        "keep",
        "limit",
        "limits",
        "now",
        "parser",
        "parts",
        "raw",
        "raw_cap",
        "ready",
        "route",
        "server",
        "sock",
        "url",
    )

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.sock = sock
        self.closing = False  # an answer ended the connection: close gently
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[_Entry] = deque()
        self.now = trio.current_time()
        self.fed = 0
        self.in_head = False
        self.in_body = False
        self.head_started = 0.0
        self.head_mark = 0
        self.head_bytes = 0
        self.url: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}
        self.head: RequestHead | None = None
        self.head_only = False
        self.http10 = False
        self.keep = True
        # The body being read: its route (None while a refused body is discarded).
        self.route: Route | None = None
        self.inflater: Inflater | None = None
        self.parts: list[bytes] = []
        self.raw = 0
        self.raw_cap = 0
        self.limit = 0
        self.body_deadline = math.inf
        self.body_seen = False
        self.expect_continue = False
        self.discarded = 0
        self.drain_deadline = math.inf

    # --- parser callbacks (synchronous, inside feed_data) ------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_started = self.now
        self.head_mark = self.fed
        self.head_bytes = 0
        self.url.clear()
        self.headers = {}

    def on_url(self, url: bytes) -> None:
        self.url.append(url)
        self.head_bytes += len(url)
        if self.head_bytes > self.limits.max_header_bytes:
            raise _Abort(self._too_large_head())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.limits.max_header_bytes:
            raise _Abort(self._too_large_head())

    def _too_large_head(self) -> Response:
        return error(431, "headers_too_large", f"request line and headers exceed "
                     f"{self.limits.max_header_bytes} bytes", close=True)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.in_body = True
        parser = self.parser
        headers = self.headers
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # llhttp refuses this itself; kept so a lenient parser cannot reopen smuggling.
            raise _Abort(error(400, "malformed_request", "a request must not carry both "
                               "Content-Length and Transfer-Encoding", close=True))
        if parser.should_upgrade():
            raise _Abort(error(400, "upgrade_not_supported",
                               "this server speaks plain HTTP/1.1 only; send no Upgrade",
                               close=True))
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        url = self.url[0] if len(self.url) == 1 else b"".join(self.url)
        path_bytes, _, query = url.partition(b"?")
        path = path_bytes.decode("latin-1")
        if "%" in path:
            path = unquote(path_bytes.decode("utf-8", "replace"))
        self.http10 = http10 = parser.get_http_version() == "1.0"
        head = self.head = RequestHead(method, path, query.decode("latin-1"), headers,
                                       "1.0" if http10 else "1.1")
        self.keep = keep = parser.should_keep_alive()
        self.head_only = head_only = method == "HEAD"
        self.body_deadline = self.now + self.limits.body_timeout
        self.body_seen = False
        length_header = headers.get(b"content-length")
        length = None if length_header is None else int(length_header)
        try:
            target = self.handler.route(head)
        except Exception:
            self.server.log_handler_error(path)
            target = _INTERNAL_ERROR
        expect = headers.get(b"expect")
        expects = expect is not None and expect.lower() == b"100-continue"
        if isinstance(target, Route):
            try:
                encoding = encoding_of(headers.get(b"content-encoding"))
                cap = raw_limit(encoding, target.limit)
                if length is not None and length > cap:
                    raise too_large(target.limit)
            except Rejected as exc:
                target = _rejected(exc, close=False)
            else:
                self.route = target
                self.limit = target.limit
                self.raw_cap = cap
                self.raw = 0
                self.inflater = None if encoding is None else Inflater(encoding, target.limit)
                self.expect_continue = expects
                return
        # Answered without the body: discard a short one, else close after the answer.
        self.route = None
        self.discarded = 0
        self.drain_deadline = self.now + DRAIN_SECONDS
        close = target.close or not keep or expects or (
            length is not None and length > DRAIN_BYTES)
        self.ready.append((None, target, not close, head_only, http10, head))

    def on_body(self, chunk: bytes) -> None:
        if self.route is None:
            self.discarded += len(chunk)
            return
        self.body_seen = True
        self.raw += len(chunk)
        try:
            if self.raw > self.raw_cap:
                raise too_large(self.limit)
            if self.inflater is None:
                self.parts.append(chunk)
            else:
                data = self.inflater.feed(chunk)
                if data:
                    self.parts.append(data)
        except Rejected as exc:
            self._body_refused(exc)

    def _body_refused(self, exc: Rejected) -> None:
        # Part of the body is in; the rest is not worth reading: answer and close.
        self.route = None
        self.inflater = None
        self.parts.clear()
        self.discarded = 0
        self.drain_deadline = self.now
        self.ready.append((None, _rejected(exc, close=True), False, self.head_only, self.http10,
                           self.head))

    def on_message_complete(self) -> None:
        self.in_body = False
        route = self.route
        if route is None:
            return
        self.route = None
        parts = self.parts
        if self.inflater is not None:
            try:
                tail = self.inflater.finish()
            except Rejected as exc:
                self._body_refused(exc)
                return
            self.inflater = None
            if tail:
                parts.append(tail)
        body = b"" if not parts else parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        assert self.head is not None
        self.ready.append((Request(self.head, body, self.now), route, self.keep,
                           self.head_only, self.http10, self.head))

    # --- the serving loop --------------------------------------------------------------------

    async def run(self) -> None:
        sock = self.sock
        ready = self.ready
        parser = self.parser
        server = self.server
        limits = self.limits
        while True:
            while ready:
                request, target, keep, head_only, http10, head = ready.popleft()
                if request is None:
                    response = target
                    assert isinstance(response, Response)
                else:
                    assert isinstance(target, Route)
                    try:
                        response = await target.call(request)
                    except Exception:
                        server.log_handler_error(request.head.path)
                        response = _INTERNAL_ERROR
                keep = keep and not response.close
                self.handler.answered(response.status, head)
                if not await self._send(render(response, keep, head_only, http10)):
                    return
                if not keep:
                    self.closing = True
                    return
            if self.in_body:
                if self.route is not None:
                    deadline = self.body_deadline
                    if self.expect_continue and not self.body_seen:
                        self.expect_continue = False
                        if not await self._send(_CONTINUE):
                            return
                else:
                    if self.discarded > DRAIN_BYTES:
                        return
                    deadline = min(self.body_deadline, self.drain_deadline)
            elif self.in_head:
                deadline = self.head_started + limits.header_timeout
            else:
                deadline = trio.current_time() + limits.idle_timeout
            try:
                data = sock.recv(RECV_BYTES)
                # Data was waiting: let other tasks run, as a blocking read would.
                await trio.lowlevel.checkpoint()
            except BlockingIOError:
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(sock)
                    continue
                self._timed_out()
                return
            if not data:
                return
            self.now = trio.current_time()
            self.fed += len(data)
            try:
                parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                abort = exc.__context__
                if isinstance(abort, _Abort):
                    server.log_malformed(abort.response.body.decode())
                    ready.append((None, abort.response, False, False, self.http10, None))
                else:
                    try:
                        raise abort or exc
                    except Exception:
                        server.log_handler_error("(parsing)")
                    ready.append((None, _INTERNAL_ERROR, False, False, self.http10, None))
            except httptools.HttpParserUpgrade:
                server.log_malformed("upgrade")
                ready.append((None, error(400, "upgrade_not_supported", "this server speaks "
                                          "plain HTTP/1.1 only; send no Upgrade"),
                              False, False, False, None))
            except httptools.HttpParserError as exc:
                server.log_malformed(str(exc))
                ready.append((None, error(400, "malformed_request",
                                          f"malformed HTTP request: {exc}"),
                              False, False, False, None))
            else:
                if self.in_head and self.fed - self.head_mark > limits.max_header_bytes:
                    server.log_malformed("headers too large")
                    ready.append((None, self._too_large_head(), False, False, self.http10, None))

    def _timed_out(self) -> None:
        """Answer 408 for a request under way (best effort); an idle connection just closes."""
        self.server.timeouts += 1
        if self.in_head or (self.in_body and self.route is not None):
            response = error(408, "request_timeout",
                             "the request did not arrive in time; send it faster",
                             close=True)
            data = render(response, False, False, self.http10)
            self.handler.answered(response.status, self.head if self.in_body else None)
            try:
                self.sock.send(data)
            except OSError:
                pass

    async def _send(self, data: bytes) -> bool:
        """Write all of ``data``; False when the client stopped reading past the timeout."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return True
        view = memoryview(data)[sent:]
        with trio.move_on_after(self.limits.write_timeout):
            while view:
                await trio.lowlevel.wait_writable(sock)
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    pass
            return True
        self.server.timeouts += 1
        return False
