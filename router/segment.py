"""Segment messages: parsing, validation, id coercion and the time fix-up.

Messages stay plain dicts decoded straight from JSON, so every field a client
sent survives to the journal unchanged; validation only normalises what the
spec says to (ids to strings, a filled ``messageId``) and adds ``_time``, the
event time in POSIX seconds that the rest of the pipeline uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypedDict, get_args

import msgspec

from .errors import Rejected

MessageType = Literal["identify", "track", "page", "screen", "group", "alias"]
MESSAGE_TYPES = frozenset(get_args(MessageType))
MAX_MESSAGE_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID = 100
# Segment payloads nest a few levels; a limit far below Python's recursion limit
# keeps a pathological message from failing later, when it is encoded or replayed.
MAX_DEPTH = 64

# A batch item's JSON: a view into its request body (``msgspec.Raw``, no copy) or
# bytes of its own. The journal and the lean decode take either.
Item = bytes | msgspec.Raw

TIME_KEY = "_time"
MIN_TIME = datetime(1, 1, 1, tzinfo=UTC).timestamp()
MAX_TIME = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()

# Tuples, not ``dict | list``: a union in an isinstance call is built anew each time.
_CONTAINERS = (dict, list)
_NUMBERS = (int, float)
_ID_TYPES = (str, int, float)  # what an id may be sent as; numbers become strings

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class Envelope(msgspec.Struct):
    """A ``/v1/batch`` body; items stay raw so each is sized and decoded alone."""

    batch: list[msgspec.Raw]
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    sentAt: Any = None
    writeKey: Any = None


_envelope_decoder = msgspec.json.Decoder(Envelope)


def _too_deep(value: Any) -> bool:
    """True when objects and arrays nest deeper than ``MAX_DEPTH`` (the top is level 1)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, _CONTAINERS):
                stack.append((child, depth + 1))
    return False


def _may_be_too_deep(raw: bytes) -> bool:
    """False when ``raw`` has too few brackets to nest past ``MAX_DEPTH``: counting
    them is cheap C, walking a decoded value is not."""
    return raw.count(b"{") + raw.count(b"[") > MAX_DEPTH


def _check_depth(raw: bytes, value: Any) -> None:
    if isinstance(value, _CONTAINERS) and _may_be_too_deep(raw) and _too_deep(value):
        raise TooDeep()


class TooDeep(Rejected):
    def __init__(self) -> None:
        super().__init__("too_deep", f"JSON nests deeper than {MAX_DEPTH} levels")


def _decode_checked(data: bytes, what: str) -> Any:
    try:
        value = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise Rejected("invalid_json", f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise TooDeep() from None
    _check_depth(data, value)
    return value


def decode_json(body: bytes) -> Any:
    return _decode_checked(body, "request body")


def decode_envelope(body: bytes) -> Envelope:
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field `batch`" in text:
            raise Rejected("missing_batch", "batch request needs a 'batch' array") from None
        if text.startswith("Expected `object`"):
            raise Rejected("invalid_body", "request body must be a JSON object") from None
        raise Rejected("invalid_batch", f"batch request is malformed: {text}") from None
    except msgspec.DecodeError as exc:
        raise Rejected("invalid_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise TooDeep() from None
    # Merged into every item, so they count against each item's depth.
    for shared in (envelope.context, envelope.integrations):
        if shared and _too_deep(shared):
            raise TooDeep()
    return envelope


def decode_item(raw: Item) -> Any:
    """One batch item; its size limit is checked on its own encoded bytes.

    ``bytes`` are used as they are (no copy), so a caller that needs the item's
    bytes too can convert a ``Raw`` once and pass those.
    """
    check_size(raw)
    return _decode_checked(bytes(raw), "message")


# --- the lean decode: what the pipeline reads, nothing else ------------------------------------


_MessageId = Annotated[str, msgspec.Meta(min_length=1)]


class _Fields(TypedDict, total=False):
    """The message fields the pipeline reads, with the context left as JSON.

    Decoded straight into the message dict the rest of the pipeline takes, with
    only the keys the client sent, as the full decode gives them. Other keys are
    skipped: the journal keeps the message's bytes.
    """

    # A Literal decodes to one shared str per type, not a new one per message; any
    # other value fails the decode, and the full decode's validation says why.
    type: MessageType | None
    # Strings, as ``validate`` keeps them: a number, a null or an empty messageId
    # fails the decode, and the full decode's validation converts or refuses it.
    messageId: _MessageId
    userId: str | None
    anonymousId: str | None
    previousId: str | None
    groupId: str | None
    event: Any
    name: Any
    category: Any
    timestamp: Any
    originalTimestamp: Any
    sentAt: Any
    # Typed, so the decode itself refuses what ``validate`` would.
    properties: dict[str, Any] | None
    traits: dict[str, Any] | None
    context: msgspec.Raw
    integrations: dict[str, Any] | None
    writeKey: Any  # Segment's webhook destination sends one per message
    # Set by ``validate``. A client's own ``_time`` sends the item to the full decode.
    _time: Any


_fields_decoder = msgspec.json.Decoder(_Fields)
_OPEN_BRACE = ord("{")
# Where a message decoded by ``decode_lean`` keeps its own JSON (an ``Item``). A
# decoded JSON value is never ``bytes`` or ``msgspec.Raw``, so a client's key of
# the same name cannot pass for it (see ``message_json``).
RAW_KEY = "_raw"


def decode_lean(data: Item) -> dict[str, Any] | None:
    """A batch item as the pipeline needs it, or None when the full decode must do.

    Most of a message's objects are its context, which the relay reads only when
    it has not seen that context before (``mapping.ExtrasCache``). Leaving it as
    JSON (a ``msgspec.Raw``, which ``context_of`` decodes on demand; a null or
    empty one is None) halves the memory each message costs to build, walk and
    free.

    Only for an item ``validate`` will leave as it is but for its time (see
    ``validation_adds_only_time``), that cannot nest past ``MAX_DEPTH`` and whose
    context is an object or null; any other item gets ``decode_item``, whose
    errors are the ones a client must see. Call ``check_size`` first.
    """
    # Counting needs bytes. A copy of a view is freed at once, so the next item's
    # copy reuses memory still in the CPU's caches; the message keeps the view.
    if _may_be_too_deep(data if type(data) is bytes else bytes(data)):
        return None
    try:
        message: dict[str, Any] = _fields_decoder.decode(data)  # type: ignore[assignment]
    except (msgspec.DecodeError, RecursionError):
        return None
    if TIME_KEY in message or "messageId" not in message:
        return None
    context = message.get("context")
    if context is not None:
        # The Raw is a view into ``data``, which the message keeps anyway: no copy.
        is_object = memoryview(context)[0] == _OPEN_BRACE
        if len(context) > 4:
            if not is_object:
                return None
        elif is_object or bytes(context) == b"null":
            message["context"] = None  # null or {}: no extras
        else:
            return None
    message[RAW_KEY] = data
    return message


def context_of(message: dict[str, Any]) -> Any:
    """The message's ``context``, decoded if ``decode_lean`` left it as JSON."""
    context = message.get("context")
    if type(context) is msgspec.Raw:
        context = message["context"] = _decoder.decode(context)
    return context


def raw_context_key(raw: msgspec.Raw) -> int | None:
    """``context_key`` of a context's JSON bytes: None for null or ``{}``."""
    return hash(bytes(raw)) if len(raw) > 4 else None


def message_json(message: dict[str, Any]) -> bytes:
    """The validated message as JSON, ``_time`` included: a lean one from the bytes its
    client sent, others encoded."""
    raw = message.get(RAW_KEY)
    if type(raw) is bytes or type(raw) is msgspec.Raw:
        return with_time(raw, message[TIME_KEY])
    return _encoder.encode(message)


class _ContextProbe(msgspec.Struct):
    """Just a message's context, as JSON bytes: skipping the rest costs little."""

    context: msgspec.Raw = msgspec.Raw(b"null")


_context_probe = msgspec.json.Decoder(_ContextProbe)


def context_key(data: bytes) -> int | None:
    """The 64-bit hash of a message's ``context`` JSON bytes (None when absent, null or
    empty): the key under which its context extras are remembered (``mapping.ExtrasCache``).

    Hashed here, while the request's bytes are still in the CPU's caches: the
    turn that uses the key comes milliseconds later, when they are not.
    """
    return raw_context_key(_context_probe.decode(data).context)


def check_size(data: Item, what: str = "") -> None:
    """Refuse a message whose bytes exceed ``MAX_MESSAGE_BYTES``."""
    if len(data) > MAX_MESSAGE_BYTES:
        detail = f" {what}" if what else ""
        raise Rejected(
            "message_too_large",
            f"message is {len(data)} bytes{detail}; the limit is {MAX_MESSAGE_BYTES} bytes",
        )


# --- time ------------------------------------------------------------------------------------


_parsed: dict[str, float] = {}
PARSED_CACHE = 4096


def parse_time(value: Any, field: str) -> float:
    """ISO-8601 string (or a POSIX number) -> POSIX seconds; naive times are UTC."""
    if isinstance(value, str):
        # A batch's messages mostly share their sentAt, and often their stamps:
        # parsing each distinct string once is a third of validation.
        known = _parsed.get(value)
        if known is not None:
            return known
        if len(_parsed) >= PARSED_CACHE:
            _parsed.clear()
        _parsed[value] = seconds = _parse_iso(value, field)
        return seconds
    if isinstance(value, _NUMBERS) and not isinstance(value, bool):
        # The same range ISO-8601 strings can express (years 1-9999): anything
        # beyond is garbage that would break date handling further down.
        if not MIN_TIME <= value <= MAX_TIME:
            raise Rejected("invalid_timestamp", f"{field} is out of range: {value!r}")
        return float(value)
    raise Rejected("invalid_timestamp", f"{field} must be an ISO-8601 string, got {value!r}")


def _parse_iso(value: str, field: str) -> float:
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise Rejected(
            "invalid_timestamp", f"{field} is not an ISO-8601 timestamp: {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def event_time(message: dict[str, Any], received_at: float, sent_at: Any) -> float:
    """The spec's time fix-up.

    An explicit ``timestamp`` wins. Without one, a client clock is corrected by
    the skew it shows between ``sentAt`` and ``originalTimestamp``:
    ``receivedAt - (sentAt - originalTimestamp)``. Otherwise ``receivedAt``.
    """
    timestamp = message.get("timestamp")
    original = message.get("originalTimestamp")
    sent = message.get("sentAt", sent_at)
    original_at = parse_time(original, "originalTimestamp") if original is not None else None
    sent_time = parse_time(sent, "sentAt") if sent is not None else None
    if timestamp is not None:
        return parse_time(timestamp, "timestamp")
    if original_at is not None and sent_time is not None:
        return received_at - (sent_time - original_at)
    return received_at


# --- validation ------------------------------------------------------------------------------


def coerce_id(message: dict[str, Any], field: str, *, required: bool) -> str | None:
    value = message.get(field)
    if value is None:
        if required:
            raise Rejected("missing_id", f"{field} is required")
        return None
    if type(value) is not str:
        if isinstance(value, bool) or not isinstance(value, _ID_TYPES):
            raise Rejected("invalid_id",
                           f"{field} must be a string, got {type(value).__name__}")
        value = str(value)
        message[field] = value
    if not value.strip():
        raise Rejected("invalid_id", f"{field} must be a non-empty string")
    return value


def validate(
    message: Any,
    *,
    type_: str | None,
    received_at: float,
    sent_at: Any = None,
    lean: bool = False,
) -> dict[str, Any]:
    """Check and normalise one message in place; raise ``Rejected`` with a reason.

    ``lean``: the message comes from ``decode_lean``, which has already held its
    object fields to objects and its ``messageId`` to a non-empty string.
    """
    if not isinstance(message, dict):
        raise Rejected("invalid_message", "message must be a JSON object")
    kind = message.get("type") if type_ is None else type_
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise Rejected(
            "invalid_type",
            f"type must be one of {', '.join(sorted(MESSAGE_TYPES))}, got {kind!r}",
        )
    message["type"] = kind

    if kind == "alias":
        coerce_id(message, "userId", required=True)
        coerce_id(message, "previousId", required=True)
        coerce_id(message, "anonymousId", required=False)
    else:
        user = coerce_id(message, "userId", required=False)
        anon = coerce_id(message, "anonymousId", required=False)
        if user is None and anon is None:
            raise Rejected("missing_id", "userId or anonymousId is required")

    if kind == "track":
        event = message.get("event")
        if not isinstance(event, str) or not event.strip():
            raise Rejected("missing_event", "track needs a non-empty 'event' string")
    elif kind == "group":
        coerce_id(message, "groupId", required=True)
    elif kind in ("page", "screen"):
        for field in ("name", "category"):
            value = message.get(field)
            if value is not None and not isinstance(value, str):
                raise Rejected("invalid_field", f"{field} must be a string")

    if lean:
        message_id = message["messageId"]
    else:
        for field in _OBJECT_FIELDS:
            value = message.get(field)
            if value is not None and type(value) is not dict and not isinstance(value, dict):
                raise Rejected("invalid_field",
                               f"{field} must be an object, got {type(value).__name__}")
        message_id = message.get("messageId")
        if message_id is None or message_id == "":
            message_id = message["messageId"] = str(uuid.uuid4())
        elif isinstance(message_id, _NUMBERS) and not isinstance(message_id, bool):
            message_id = message["messageId"] = str(message_id)
        elif not isinstance(message_id, str):
            raise Rejected("invalid_message_id", "messageId must be a string")
    if len(message_id) > MAX_MESSAGE_ID:
        raise Rejected(
            "invalid_message_id",
            f"messageId is {len(message_id)} characters; the limit is {MAX_MESSAGE_ID}",
        )

    message[TIME_KEY] = event_time(message, received_at, sent_at)
    return message


_IDS = ("userId", "anonymousId", "previousId", "groupId")
_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")


def validation_adds_only_time(item: Any) -> bool:
    """True when ``validate`` will change nothing in this batch item but add ``_time``.

    That is: a string ``messageId``, ids that are strings (or absent) and no
    ``_time`` of its own. Clients send such messages nearly always, and for them
    the journal can keep the client's own bytes instead of encoding the message
    again (see ``item_bytes``). Check before ``validate``: it changes the item.
    """
    if type(item) is not dict or TIME_KEY in item:
        return False
    return _ids_as_sent(item.get("messageId"), [item.get(field) for field in _IDS])


def _ids_as_sent(message_id: Any, ids: Sequence[Any]) -> bool:
    """True when ``validate`` keeps these as they are: a non-empty string
    ``messageId``, and ids that are strings or absent."""
    if type(message_id) is not str or not message_id:
        return False
    # A loop, not ``all()`` over a generator: this runs per message, and is faster.
    for value in ids:  # noqa: SIM110
        if value is not None and type(value) is not str:
            return False
    return True


def item_bytes(message: dict[str, Any]) -> bytes:
    """A validated message's JSON bytes without ``_time``, the form pipelines take
    items in: the event time travels beside the bytes (``message[TIME_KEY]``), so
    a client's own bytes can be kept as they came."""
    at = message.pop(TIME_KEY)
    try:
        return _encoder.encode(message)
    finally:
        message[TIME_KEY] = at


_TIME_MEMBER = b',"' + TIME_KEY.encode() + b'":'


def with_time(raw: Item, at: float) -> bytes:
    """An item's bytes (see ``item_bytes``) with ``"_time": at`` added as its last key."""
    if type(raw) is not bytes:
        raw = bytes(raw)
    return b"".join((raw[:raw.rindex(b"}")], _TIME_MEMBER, repr(at).encode(), b"}"))
