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


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Command)


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> Command:
    return _decoder.decode(data)
