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
import hashlib
import hmac
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import msgspec
import structlog
import trio

from . import journal, segment
from .admin import INTAKE_ALONE, OPERATOR_PATHS, not_found, operator_response
from .customer import USES_EXTRAS
from .errors import Rejected
from .metrics import Metrics
from .server import Request, RequestHead, Response, Route

log = structlog.get_logger("router.intake")

SINGLE_PATHS = {f"/v1/{kind}": kind for kind in segment.MESSAGE_TYPES}
BATCH_PATHS = frozenset({"/v1/batch", "/v1/import"})
WEBHOOK_PATH = "/v1/webhook"
RETRY_AFTER = b"2"

_encode = msgspec.json.Encoder().encode
_raw_array = msgspec.json.Decoder(list[msgspec.Raw])


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


@dataclass(slots=True)
class Validated:
    """Validated items of a request: messages, their journal bytes, each one's position
    in the request, and the rejects (index, code, message)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    items: list[segment.Item] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    # Each message's ``segment.context_key``, under which its extras are
    # remembered (None: merged with a shared part, absent, or not needed).
    contexts: list[int | None] = field(default_factory=list)


class Pipeline(Protocol):
    """What the intake needs from the router."""

    metrics: Metrics

    def project_for(self, write_key: str) -> str | None: ...

    def wall(self) -> float: ...

    @property
    def accepting(self) -> bool: ...

    async def accept(
        self, write_key: str, messages: Sequence[dict[str, Any]], items: Sequence[segment.Item],
        shared: bytes | None = None, contexts: Sequence[int | None] | None = None,
    ) -> Accepted: ...

    def report(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...

    def readiness(self) -> str | None: ...


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
    """The Segment endpoints and the operator endpoints in ``operator_paths``, as a
    server handler (see ``admin.py`` for which those are)."""

    def __init__(self, pipeline: Pipeline, *, operator_paths: Collection[str] = INTAKE_ALONE,
                 webhook_secret: str | None = None) -> None:
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
        self.operator_paths = frozenset(operator_paths)
        self._secret = webhook_secret.encode() if webhook_secret is not None else None
        self._routes: dict[str, Route] = {}
        # The requests_total endpoint label of each Segment path; others are "other".
        self._endpoints: dict[str, str] = {}
        for path, kind in SINGLE_PATHS.items():
            self._routes[path] = Route(segment.MAX_MESSAGE_BYTES,
                                       partial(self._answer, self._single, kind, "single"))
            self._endpoints[path] = "single"
        for path in BATCH_PATHS:
            self._routes[path] = Route(segment.MAX_REQUEST_BYTES,
                                       partial(self._answer, self._batch, "", "batch"))
            self._endpoints[path] = "batch"
        self._routes[WEBHOOK_PATH] = Route(segment.MAX_REQUEST_BYTES,
                                           partial(self._answer, self._webhook, "", "webhook"))
        self._endpoints[WEBHOOK_PATH] = "webhook"

    def answered(self, status: int, head: RequestHead | None) -> None:
        # Scrapes and probes are not Segment traffic: an alert on the error rate
        # must not move with the scrape interval.
        endpoint = "other"
        if head is not None:
            path = head.path.rstrip("/") or "/"
            if path in OPERATOR_PATHS:
                return
            endpoint = self._endpoints.get(path, "other")
        self.metrics.inc("requests_total", endpoint=endpoint, status=str(status))

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
        operator = operator_response(self.pipeline, head, path, self.operator_paths)
        return operator if operator is not None else not_found(path)

    async def _answer(self, handle: Any, kind: str, endpoint: str, request: Request) -> Response:
        try:
            response: Response = await handle(request, kind)
        except Rejected as exc:
            response = error_response(exc)
        except Overloaded as exc:
            self.metrics.inc("overloaded_total", reason=exc.reason)
            response = json_response(
                503, {"code": exc.code, "message": f"{exc.reason}; retry later"},
                [(b"retry-after", RETRY_AFTER)])
        self.metrics.observe("intake_ack_seconds", trio.current_time() - request.received_at,
                             endpoint=endpoint)
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
        await pipeline.accept(write_key, [message], [segment.item_bytes(message)])
        self.metrics.observe("batch_messages", 1, endpoint="single")
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
        valid = self._validate_items(envelope.batch, shared, shared_bytes, pipeline.wall(),
                                     envelope.sentAt)
        rejected = valid.rejected
        result = await pipeline.accept(write_key, valid.messages, valid.items, shared_bytes,
                                       valid.contexts)
        self.metrics.observe("batch_messages", len(envelope.batch), endpoint="batch")
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

    def _validate_items(
        self, raws: Sequence[msgspec.Raw | bytes], shared: dict[str, Any] | None,
        shared_bytes: bytes | None, received_at: float, sent_at: Any,
    ) -> Validated:
        """Each raw item decoded, size-checked and validated alone; the shared part (a
        batch's ``context``/``integrations``) merged into the messages but left out of
        their journal bytes: the journal keeps it once per request."""
        valid = Validated()
        messages, items, rejected = valid.messages, valid.items, valid.rejected
        shared_size = len(shared_bytes) if shared_bytes else 0
        for index, raw in enumerate(raws):
            try:
                segment.check_size(raw)
                # A shared part is merged into each message, so those get the full decode.
                # The lean one reads the item where it lies in the request body: its
                # message and journal row keep that view, not a copy.
                item = None if shared else segment.decode_lean(raw)
                if item is not None:
                    message = segment.validate(item, type_=None, received_at=received_at,
                                               sent_at=sent_at, lean=True)
                    stored = raw
                    context = message.get("context")
                    context_key = (segment.raw_context_key(context)
                                   if context is not None and message["type"] in USES_EXTRAS
                                   else None)
                else:
                    data = bytes(raw)
                    item = segment.decode_item(data)
                    as_sent = segment.validation_adds_only_time(item)
                    message = segment.validate(
                        item, type_=None, received_at=received_at, sent_at=sent_at)
                    stored = data if as_sent else segment.item_bytes(message)
                    if shared:
                        message = journal.merge_shared(message, shared)
                        # The limit holds on what is stored and sent: the shared part
                        # goes into every command this message produces.
                        if len(stored) + shared_size > segment.MAX_MESSAGE_BYTES:
                            segment.check_size(_encode(message), "with the batch's shared part")
                        context_key = None
                    elif message["type"] in USES_EXTRAS:
                        context_key = segment.context_key(data)
                    else:
                        context_key = None
                messages.append(message)
                items.append(stored)
                valid.indexes.append(index)
                valid.contexts.append(context_key)
            except Rejected as exc:
                rejected.append({"index": index, "code": exc.code, "message": exc.message})
                self.metrics.inc("messages_rejected_total", reason=exc.code)
            except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError) as exc:
                rejected.append({"index": index, "code": "invalid_message",
                                 "message": f"message cannot be used: {exc}"})
                self.metrics.inc("messages_rejected_total", reason="invalid_message")
        return valid

    # --- Segment's webhook destination -----------------------------------------------------

    async def _webhook(self, request: Request, _kind: str) -> Response:
        """One message object, or a JSON array of them (the destination's batching).

        Each message carries its ``type``. With a webhook secret the body must be
        signed first: nothing of a request with a bad signature is read further.
        """
        body = request.body
        headers = request.head.headers
        if self._secret is not None:
            self._check_signature(headers.get(b"x-signature"), body)
        header_key, bearer = basic_user(headers)
        if not body.lstrip().startswith(b"["):
            return await self._webhook_one(body, header_key, bearer)
        try:
            raws = _raw_array.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise Rejected("invalid_json", f"request body is not valid JSON: {exc}") from None
        if len(raws) > segment.MAX_BATCH_MESSAGES:
            raise Rejected("batch_too_large", f"array has {len(raws)} messages; the limit is "
                           f"{segment.MAX_BATCH_MESSAGES}")
        valid = self._validate_items(raws, None, None, self.pipeline.wall(), None)
        groups, key_rejects = self._by_write_key(valid, header_key)
        if not groups and self.pipeline.project_for(header_key or "") is None:
            self._write_key(header_key, None, bearer)  # raises the 401
        for reject in key_rejects:
            self.metrics.inc("messages_rejected_total", reason=reject["code"])
        accepted = duplicates = 0
        # One journal commit per write key: an overload past the first leaves the
        # earlier ones kept, and the client's retry is deduplicated by messageId.
        for write_key, (messages, items) in groups.items():
            result = await self.pipeline.accept(write_key, messages, items)
            accepted += result.accepted
            duplicates += result.duplicates
        self.metrics.observe("batch_messages", len(raws), endpoint="webhook")
        rejected = sorted(valid.rejected + key_rejects, key=lambda r: int(r["index"]))
        return json_response(200, {"success": True, "accepted": accepted,
                                   "duplicates": duplicates, "rejected": rejected})

    async def _webhook_one(self, body: bytes, header_key: str | None,
                           bearer: bool) -> Response:
        data = segment.decode_item(body)
        if not isinstance(data, dict):
            raise Rejected("invalid_body",
                           "request body must be a message object or an array of messages")
        write_key = self._write_key(header_key, data.get("writeKey"), bearer)
        try:
            message = segment.validate(data, type_=None, received_at=self.pipeline.wall())
        except Rejected as exc:
            self.metrics.inc("messages_rejected_total", reason=exc.code)
            raise
        await self.pipeline.accept(write_key, [message], [segment.item_bytes(message)])
        self.metrics.observe("batch_messages", 1, endpoint="webhook")
        return Response(200, b'{"success":true}')

    def _by_write_key(
        self, valid: Validated, header_key: str | None,
    ) -> tuple[dict[str, tuple[list[dict[str, Any]], list[segment.Item]]], list[dict[str, Any]]]:
        """Valid messages grouped by write key (a message's own ``writeKey``, else the
        Basic auth one) and the rejects of those with no known key."""
        project_for = self.pipeline.project_for
        fallback = header_key if header_key and project_for(header_key) is not None else None
        groups: dict[str, tuple[list[dict[str, Any]], list[segment.Item]]] = {}
        rejects: list[dict[str, Any]] = []
        for message, item, index in zip(valid.messages, valid.items, valid.indexes,
                                        strict=True):
            own = message.get("writeKey")
            key = own if isinstance(own, str) and project_for(own) is not None else fallback
            if key is None:
                code, text = (("invalid_write_key", "unknown write key") if own is not None
                              else ("missing_write_key", "no write key: send it as the Basic "
                                    "auth username or as writeKey in the message"))
                rejects.append({"index": index, "code": code, "message": text})
                continue
            group = groups.setdefault(key, ([], []))
            group[0].append(message)
            group[1].append(item)
        return groups, rejects

    def _check_signature(self, given: bytes | None, body: bytes) -> None:
        """``X-Signature``: hex HMAC-SHA1 of the body as handed to the handler (after
        any Content-Encoding is undone), keyed with the webhook secret."""
        assert self._secret is not None
        expected = hmac.new(self._secret, body, hashlib.sha1).hexdigest().encode()
        if given is None or not hmac.compare_digest(given.strip().lower(), expected):
            self.metrics.inc("webhook_signature_failures_total")
            raise Rejected("invalid_signature", "X-Signature is missing or is not the "
                           "HMAC-SHA1 of the body with the webhook secret", status=401)
