"""The Segment endpoints: write keys, validation, per-message rejects, answers.

A handler for the relay's HTTP server (``server.py``), which reads bodies with
the limits enforced while reading (a gzip bomb is never inflated past the
limit). Status codes follow what Segment clients expect: 200 accepted (only once
the accepted messages are journaled), 400 malformed (``code``/``message``), 401
bad write key, 503 with ``Retry-After`` when overloaded or shutting down
(clients retry those).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import msgspec
import structlog

from . import journal, segment
from .errors import Rejected
from .metrics import Metrics
from .server import Request, RequestHead, Response, Route

log = structlog.get_logger("router.intake")

SINGLE_PATHS = {f"/v1/{kind}": kind for kind in segment.MESSAGE_TYPES}
BATCH_PATHS = frozenset({"/v1/batch", "/v1/import"})
RETRY_AFTER = b"2"

_encode = msgspec.json.Encoder().encode


class Overloaded(Exception):
    """The pipeline cannot take more right now; the client should retry later."""

    def __init__(self, reason: str, code: str = "overloaded") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


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
        self, write_key: str, messages: Sequence[dict[str, Any]], items: Sequence[bytes],
        shared: bytes | None = None,
    ) -> Accepted: ...

    def report(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


def basic_user(headers: dict[bytes, bytes]) -> tuple[str | None, bool]:
    """The write key from ``Authorization: Basic``; second item: a Bearer was sent."""
    value = headers.get(b"authorization")
    if value is None:
        return None, False
    scheme, _, credentials = value.decode("latin-1").partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):  # ValueError: not ASCII, or not UTF-8 inside
            return None, False
        return decoded.partition(":")[0] or None, False
    return None, scheme == "bearer"


def json_response(status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None,
                  ) -> Response:
    return Response(status, _encode(body), headers=headers or [])


def error_response(exc: Rejected, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return json_response(exc.status, exc.body(), headers)


class Intake:
    """The Segment endpoints and the operator endpoints, as a server handler."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
        self.metrics.inc("requests_total", 0, status="200")
        self._routes: dict[str, Route] = {}
        for path, kind in SINGLE_PATHS.items():
            self._routes[path] = Route(segment.MAX_MESSAGE_BYTES,
                                       partial(self._answer, self._single, kind))
        for path in BATCH_PATHS:
            self._routes[path] = Route(segment.MAX_REQUEST_BYTES,
                                       partial(self._answer, self._batch, ""))

    def answered(self, status: int) -> None:
        self.metrics.inc("requests_total", status=str(status))

    def route(self, head: RequestHead) -> Route | Response:
        path = head.path.rstrip("/") or "/"
        method = head.method
        route = self._routes.get(path)
        if route is not None:
            if method != "POST":
                return json_response(
                    405, {"code": "method_not_allowed", "message": f"use POST for {path}"})
            if not self.pipeline.accepting:
                self.metrics.inc("overloaded_total", reason="shutting_down")
                return json_response(
                    503, {"code": "unavailable", "message": "the relay is shutting down; retry"},
                    [(b"retry-after", RETRY_AFTER)])
            return route
        if path == "/health" and method in ("GET", "HEAD"):
            health = self.pipeline.health()
            return json_response(200 if health["status"] == "ok" else 503, health)
        if path == "/metrics" and method == "GET":
            return Response(200, self.metrics.render().encode(),
                            content_type=b"text/plain; version=0.0.4")
        if path == "/report" and method == "GET":
            return json_response(200, self.pipeline.report())
        return json_response(404, {"code": "not_found", "message": f"no endpoint {path}"})

    async def _answer(self, handle: Any, kind: str, request: Request) -> Response:
        try:
            response: Response = await handle(request, kind)
        except Rejected as exc:
            response = error_response(exc)
        except Overloaded as exc:
            self.metrics.inc("overloaded_total", reason=exc.reason)
            response = json_response(
                503, {"code": exc.code, "message": f"{exc.reason}; retry later"},
                [(b"retry-after", RETRY_AFTER)])
        return response

    async def _single(self, request: Request, kind: str) -> Response:
        pipeline = self.pipeline
        header_key, bearer = basic_user(request.head.headers)
        data = segment.decode_json(request.body)
        if not isinstance(data, dict):
            raise Rejected("invalid_body", "request body must be a JSON object")
        write_key = self._write_key(header_key, data.get("writeKey"), bearer)
        try:
            message = segment.validate(data, type_=kind, received_at=pipeline.wall())
        except Rejected as exc:
            self.metrics.inc("messages_rejected_total", reason=exc.code)
            raise
        await pipeline.accept(write_key, [message], [_encode(message)])
        return Response(200, b'{"success":true}')

    async def _batch(self, request: Request, _kind: str) -> Response:
        pipeline = self.pipeline
        header_key, bearer = basic_user(request.head.headers)
        envelope = segment.decode_envelope(request.body)
        write_key = self._write_key(header_key, envelope.writeKey, bearer)
        if len(envelope.batch) > segment.MAX_BATCH_MESSAGES:
            raise Rejected(
                "batch_too_large",
                f"batch has {len(envelope.batch)} messages; the limit is "
                f"{segment.MAX_BATCH_MESSAGES}",
            )
        shared = journal.shared_part(envelope.context, envelope.integrations)
        shared_bytes = _encode(shared) if shared else None
        messages, items, rejected = self._validate_batch(envelope, shared, shared_bytes,
                                                         pipeline.wall())
        result = await pipeline.accept(write_key, messages, items, shared_bytes)
        return json_response(200, {"success": True, "accepted": result.accepted,
                                   "duplicates": result.duplicates, "rejected": rejected})

    def _write_key(self, header_key: str | None, body_key: Any, bearer: bool) -> str:
        for candidate in (body_key, header_key):
            if isinstance(candidate, str) and self.pipeline.project_for(candidate) is not None:
                return candidate
        hint = " (a Bearer token needs writeKey in the body)" if bearer else ""
        if header_key is None and body_key is None:
            raise Rejected("missing_write_key", "no write key: send it as the Basic auth "
                           f"username or as writeKey in the body{hint}", status=401)
        raise Rejected("invalid_write_key", f"unknown write key{hint}", status=401)

    def _validate_batch(
        self, envelope: segment.Envelope, shared: dict[str, Any] | None,
        shared_bytes: bytes | None, received_at: float,
    ) -> tuple[list[dict[str, Any]], list[bytes], list[dict[str, Any]]]:
        """The valid messages (the shared part merged in), their journal bytes (without
        it: the journal keeps it once per request) and the rejects."""
        messages: list[dict[str, Any]] = []
        items: list[bytes] = []
        rejected: list[dict[str, Any]] = []
        shared_size = len(shared_bytes) if shared_bytes else 0
        for index, raw in enumerate(envelope.batch):
            try:
                data = bytes(raw)  # one copy, for decoding and for the journal
                item = segment.decode_item(data)
                as_sent = segment.validation_adds_only_time(item)
                message = segment.validate(
                    item, type_=None, received_at=received_at, sent_at=envelope.sentAt)
                stored = (segment.with_time(data, message[segment.TIME_KEY]) if as_sent
                          else _encode(message))
                if shared:
                    message = journal.merge_shared(message, shared)
                    # The limit holds on what is stored and sent: the shared part
                    # goes into every command this message produces.
                    if len(stored) + shared_size > segment.MAX_MESSAGE_BYTES:
                        segment.check_size(_encode(message), "with the batch's shared part")
                messages.append(message)
                items.append(stored)
            except Rejected as exc:
                rejected.append({"index": index, "code": exc.code, "message": exc.message})
                self.metrics.inc("messages_rejected_total", reason=exc.code)
            except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError) as exc:
                rejected.append({"index": index, "code": "invalid_message",
                                 "message": f"message cannot be used: {exc}"})
                self.metrics.inc("messages_rejected_total", reason="invalid_message")
        return messages, items, rejected
