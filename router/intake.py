"""The HTTP intake: Segment's tracking API as an ASGI app.

Reads bodies with the limits enforced while reading (a gzip bomb is never
inflated past the limit), authenticates the write key, validates each message,
and answers only after the accepted messages are journaled. Status codes follow
what Segment clients expect: 200 accepted, 400 malformed (``code``/``message``),
401 bad write key, 503 with ``Retry-After`` when overloaded (clients retry those).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec
import structlog
import trio

from . import segment
from .errors import Rejected
from .metrics import Metrics

log = structlog.get_logger("router.intake")

SINGLE_PATHS = {f"/v1/{kind}": kind for kind in segment.MESSAGE_TYPES}
BATCH_PATHS = frozenset({"/v1/batch", "/v1/import"})
RETRY_AFTER = "2"
# A refused request's unread body is drained up to this much so the connection
# can serve the next request; past it the answer says ``Connection: close``.
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 5.0
CLOSE = (b"connection", b"close")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_encode = msgspec.json.Encoder().encode


class Overloaded(Exception):
    """The pipeline cannot take more right now; the client should retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Accepted(msgspec.Struct):
    """What happened to a request's messages: journaled, skipped as seen, rejected."""

    accepted: int
    duplicates: int
    rejected: list[dict[str, Any]] = msgspec.field(default_factory=list)


class Pipeline(Protocol):
    """What the intake needs from the router."""

    metrics: Metrics

    def project_for(self, write_key: str) -> str | None: ...

    def wall(self) -> float: ...

    @property
    def accepting(self) -> bool: ...

    async def accept(
        self, write_key: str, messages: Sequence[dict[str, Any]],
        bodies: Sequence[bytes | None] | None = None,
    ) -> Accepted: ...

    def report(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


class BodyTooLarge(Rejected):
    def __init__(self, limit: int) -> None:
        super().__init__("body_too_large", f"request body exceeds the {limit // 1024} KB limit")


class BodyStream:
    """``receive`` for one request body, remembering whether the body has ended.

    When a request is refused before its body was read in full, the rest must
    be drained (or the connection closed): otherwise the client may reuse a
    connection the server is about to drop, or lose the answer to a reset.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.done = False

    async def __call__(self) -> dict[str, Any]:
        event = await self._receive()
        if event["type"] != "http.request" or not event.get("more_body", False):
            self.done = True
        return event

    async def drain(self, limit: int, seconds: float) -> bool:
        """Discard the rest of the body; False if it is longer or slower than allowed."""
        if self.done:
            return True
        size = 0
        with trio.move_on_after(seconds):
            while not self.done:
                event = await self()
                size += len(event.get("body", b""))
                if size > limit:
                    return False
            return True
        return False


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Read the request body, inflating gzip/deflate, never past ``limit`` bytes.

    The limit holds on the inflated size, checked as the body streams in, so a
    compressed bomb is refused after inflating at most ``limit + 1`` bytes. The
    compressed bytes are capped too (at twice the limit: real payloads compress),
    so a stream of empty gzip members or trailing junk cannot run on forever.
    """
    encoding = ""
    length: int | None = None
    for name, value in scope.get("headers", ()):
        if name == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise Rejected("invalid_header", "Content-Length is not a number") from None
    wbits: int | None
    if encoding in ("", "identity"):
        wbits = None
    elif encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise Rejected("unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; "
                       "send gzip or no encoding")
    raw_limit = limit if wbits is None else 2 * limit
    if length is not None and length > raw_limit:
        raise BodyTooLarge(limit)
    inflater = None if wbits is None else zlib.decompressobj(wbits)
    parts: list[bytes] = []
    size = 0
    raw = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise Rejected("disconnected", "client went away")
        chunk: bytes = event.get("body", b"")
        raw += len(chunk)
        if raw > raw_limit:
            raise BodyTooLarge(limit)
        if inflater is None or wbits is None:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            if chunk:
                parts.append(chunk)
        else:
            while chunk:
                if inflater.eof:
                    # Concatenated gzip members form one body (RFC 1952); anything
                    # else after the end fails the next member's header check.
                    inflater = zlib.decompressobj(wbits)
                try:
                    data = inflater.decompress(chunk, limit + 1 - size)
                except zlib.error as exc:
                    raise Rejected(
                        "invalid_body", f"body is not valid {encoding}: {exc}") from None
                size += len(data)
                if size > limit or inflater.unconsumed_tail:
                    raise BodyTooLarge(limit)
                parts.append(data)
                chunk = inflater.unused_data if inflater.eof else b""
        if not event.get("more_body", False):
            break
    if inflater is not None:
        try:
            tail = inflater.flush()
        except zlib.error as exc:
            raise Rejected("invalid_body", f"body is not valid {encoding}: {exc}") from None
        size += len(tail)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(tail)
        if not inflater.eof:
            raise Rejected("invalid_body", f"{encoding} body is truncated")
    return b"".join(parts)


def basic_user(scope: Scope) -> tuple[str | None, bool]:
    """The write key from ``Authorization: Basic``; second item: a Bearer was sent."""
    for name, value in scope.get("headers", ()):
        if name != b"authorization":
            continue
        scheme, _, credentials = value.decode("latin-1").partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None, False
            return decoded.partition(":")[0] or None, False
        if scheme == "bearer":
            return None, True
    return None, False


class Intake:
    """The ASGI application."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
        self.metrics.inc("requests_total", 0, status="200")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        metrics = self.metrics
        raw_send = send

        async def send_counted(event: dict[str, Any]) -> None:
            if event["type"] == "http.response.start":
                metrics.inc("requests_total", status=str(event["status"]))
            await raw_send(event)

        send = send_counted
        path: str = scope["path"].rstrip("/") or "/"
        method: str = scope["method"]
        try:
            if path in BATCH_PATHS or path in SINGLE_PATHS:
                if method != "POST":
                    await _json(send, 405, {"code": "method_not_allowed",
                                            "message": f"use POST for {path}"})
                    return
                status, body, headers = await self._ingest(scope, receive, path)
                await _json(send, status, body, headers)
            elif path == "/health" and method in ("GET", "HEAD"):
                health = self.pipeline.health()
                await _json(send, 200 if health["status"] == "ok" else 503, health)
            elif path == "/metrics" and method == "GET":
                await _send(send, 200, self.metrics.render().encode(),
                            [(b"content-type", b"text/plain; version=0.0.4")])
            elif path == "/report" and method == "GET":
                await _json(send, 200, self.pipeline.report())
            else:
                await _json(send, 404, {"code": "not_found", "message": f"no endpoint {path}"})
        except Exception:
            log.exception("intake failed", path=path)
            await _json(send, 500, {"code": "internal_error",
                                    "message": "the relay failed to handle this request"})

    async def _ingest(
        self, scope: Scope, receive: Receive, path: str
    ) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        pipeline = self.pipeline
        if not pipeline.accepting:
            self.metrics.inc("overloaded_total", reason="shutting_down")
            return 503, {"code": "unavailable", "message": "the relay is shutting down; retry"}, [
                (b"retry-after", RETRY_AFTER.encode()), CLOSE]
        single = SINGLE_PATHS.get(path)
        limit = segment.MAX_MESSAGE_BYTES if single else segment.MAX_REQUEST_BYTES
        header_key, bearer = basic_user(scope)
        stream = BodyStream(receive)
        try:
            body = await read_body(scope, stream, limit)
            received_at = pipeline.wall()
            if single:
                data = segment.decode_json(body)
                if not isinstance(data, dict):
                    raise Rejected("invalid_body", "request body must be a JSON object")
                write_key = self._write_key(header_key, data.get("writeKey"))
                try:
                    message = segment.validate(data, type_=single, received_at=received_at)
                except Rejected as exc:
                    self.metrics.inc("messages_rejected_total", reason=exc.code)
                    raise
                messages = [message]
                bodies: list[bytes | None] = [None]
                rejected: list[dict[str, Any]] = []
            else:
                envelope = segment.decode_envelope(body)
                write_key = self._write_key(header_key, envelope.writeKey)
                if len(envelope.batch) > segment.MAX_BATCH_MESSAGES:
                    raise Rejected(
                        "batch_too_large",
                        f"batch has {len(envelope.batch)} messages; the limit is "
                        f"{segment.MAX_BATCH_MESSAGES}",
                    )
                messages, bodies, rejected = self._validate_batch(envelope, received_at)
        except Rejected as exc:
            if exc.status == 401 and bearer:
                exc.message += " (a Bearer token needs writeKey in the body)"
            headers: list[tuple[bytes, bytes]] = []
            if not await stream.drain(DRAIN_BYTES, DRAIN_SECONDS):
                headers.append(CLOSE)
            return exc.status, exc.body(), headers
        try:
            result = await pipeline.accept(write_key, messages, bodies)
        except Overloaded as exc:
            self.metrics.inc("overloaded_total", reason=exc.reason)
            return 503, {"code": "overloaded", "message": f"{exc.reason}; retry later"}, [
                (b"retry-after", RETRY_AFTER.encode())]
        response: dict[str, Any] = {"success": True}
        if not single:
            response["accepted"] = result.accepted
            response["duplicates"] = result.duplicates
            response["rejected"] = rejected
        return 200, response, []

    def _write_key(self, header_key: str | None, body_key: Any) -> str:
        for candidate in (body_key, header_key):
            if isinstance(candidate, str) and self.pipeline.project_for(candidate) is not None:
                return candidate
        if header_key is None and body_key is None:
            raise Rejected("missing_write_key", "no write key: send it as the Basic auth "
                           "username or as writeKey in the body", status=401)
        raise Rejected("invalid_write_key", "unknown write key", status=401)

    def _validate_batch(
        self, envelope: segment.Envelope, received_at: float
    ) -> tuple[list[dict[str, Any]], list[bytes | None], list[dict[str, Any]]]:
        """The valid messages, their journal bytes where the client's can serve
        (None: encode the message), and the rejects."""
        messages: list[dict[str, Any]] = []
        bodies: list[bytes | None] = []
        rejected: list[dict[str, Any]] = []
        # Shared context or integrations are merged into every item, which then
        # differs from the client's bytes.
        shared = bool(envelope.context or envelope.integrations)
        for index, raw in enumerate(envelope.batch):
            try:
                data = bytes(raw)  # one copy, for decoding and for the journal
                item = segment.decode_item(data)
                if shared:
                    item = segment.merge_envelope(item, envelope)
                as_sent = not shared and segment.validation_adds_only_time(item)
                message = segment.validate(
                    item, type_=None, received_at=received_at, sent_at=envelope.sentAt)
                messages.append(message)
                bodies.append(
                    segment.with_time(data, message[segment.TIME_KEY]) if as_sent
                    else None)
            except (Rejected, msgspec.DecodeError) as exc:
                if isinstance(exc, Rejected):
                    code, reason = exc.code, exc.message
                else:
                    code, reason = "invalid_json", str(exc)
                rejected.append({"index": index, "code": code, "message": reason})
                self.metrics.inc("messages_rejected_total", reason=code)
        return messages, bodies, rejected


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send(send: Send, status: int, body: bytes,
                headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, body: Any,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, _encode(body),
                [(b"content-type", b"application/json"), *(headers or [])])
