"""Byte strings joined around a separator with one copy of each part."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def join_wrapped(head: bytes, parts: Sequence[Any], tail: bytes, sep: bytes = b",") -> bytes:
    """``head + sep.join(parts) + tail``, each part copied once.

    Every ``+`` around a join copies the joined bytes again. For a request's journal
    row or an Infinario bulk body (tens of KB, each built once per request) those
    copies were most of the memory traffic of building it. ``parts`` may be any
    bytes-like objects (``msgspec.Raw`` views included).
    """
    if not parts:
        return head + tail
    if len(parts) == 1:
        return b"".join((head, parts[0], tail))
    edges = list(parts)
    edges[0] = b"".join((head, edges[0]))
    edges[-1] = b"".join((edges[-1], tail))
    return sep.join(edges)
