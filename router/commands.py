"""Infinario commands in the router's own dialect-neutral form.

Customer turns produce these; ``infinario.py`` encodes each once, in the wire
form of the configured tracking API, for the outbox (a request body is then a
join of its commands). Dead letters keep the neutral form, so they can be read
and replayed whatever the dialect.
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


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Command)


def encode_command(command: Command) -> bytes:
    """The command's neutral JSON (an array), as dead letters keep it."""
    return _encoder.encode(command)


def decode_command(data: bytes) -> Command:
    return _decoder.decode(data)
