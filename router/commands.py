"""Infinario commands in the router's own dialect-neutral form.

The actors produce these, the outbox stores them, and ``infinario.py`` encodes
them for whichever tracking API is configured. Keeping them neutral lets a
spool written under one dialect be delivered under the other after a restart.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

CommandKind = Literal["event", "customer"]


class Command(msgspec.Struct, array_like=True, gc=False):
    """One Infinario command.

    ``kind`` is ``"event"`` (legacy ``crm/events``, v2 ``customers/events``) or
    ``"customer"`` (legacy ``crm/customers``, v2 ``customers``). ``timestamp`` is
    the event time for events and the update time for customer updates, in POSIX
    seconds. ``ids`` holds ``registered`` and/or ``cookie``.
    """

    kind: CommandKind
    project: str
    ids: dict[str, str]
    properties: dict[str, Any]
    timestamp: float
    event_type: str | None = None
    # The customer (the relay's own key) whose turn produced it: it decides the
    # sender lane, and a re-dealt backlog keeps each customer's order by it.
    customer: int = 0


class Encoded(msgspec.Struct, array_like=True, gc=False):
    """A command as the outbox holds it: ``ids`` and ``properties`` stay encoded.

    Its JSON is exactly a ``Command``'s, so either reads the other's rows. The
    dialects splice the two encoded parts into their request bodies, so the
    properties (most of a command's bytes) are encoded once, not once for the
    outbox and again for every request, and a command waiting to be sent holds
    bytes instead of live dicts.
    """

    kind: CommandKind
    project: str
    ids: msgspec.Raw
    properties: msgspec.Raw
    timestamp: float
    event_type: str | None = None
    customer: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Command)
_encoded_decoder = msgspec.json.Decoder(Encoded)


def encode_command(command: Command, customer: int = 0) -> Encoded:
    """The outbox form of ``command``, produced by ``customer``."""
    encode = _encoder.encode
    return Encoded(command.kind, command.project, msgspec.Raw(encode(command.ids)),
                   msgspec.Raw(encode(command.properties)), command.timestamp,
                   command.event_type, customer)


def encode_encoded(encoded: Encoded) -> bytes:
    return _encoder.encode(encoded)


def decode_encoded(data: bytes) -> Encoded:
    """An outbox row's command; its encoded parts are views into ``data``."""
    return _encoded_decoder.decode(data)


def decode_command(data: bytes) -> Command:
    return _decoder.decode(data)
