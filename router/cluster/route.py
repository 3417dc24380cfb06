"""The intake's one atomic step in the Redis Streams mode: ``route.lua``.

One call routes one request (a write key, a project, its messages in order):
messageId dedup, then identity (the rules of ``Identity.resolve``), then an
append to each message's customer's partition stream ``in:{P}:<key mod partitions>``.

Entries of ``in:{P}:<p>`` (values are strings; customer keys are decimal):

* a message: ``k`` customer key, ``w`` write key, ``b`` the body as given, and
  what resolving it did to customer ``k``'s ids. The worker applies these before
  the turn, in this order, and then holds what ``Identity.resolve`` would hold:
  ``m`` merged customer key: merge that customer's state (sent on from its
  ``handoff``) into ``k`` with ``customer.merge_into``;
  ``r`` the registered id ``k`` gained;
  ``a`` the cookie appended to ``k``'s cookies;
  ``f`` the customer cookie ``a`` was taken from (a shared device; that
  customer's partition got a ``drop`` for it, written before this entry);
  ``t`` how many of ``k``'s oldest cookies to remove last (``MAX_COOKIES``).
  Absent fields did not happen. A ``k`` the worker has no state for is new.
* a control entry, told apart by its ``c`` field:
  ``c=handoff``: customer ``k`` was merged into customer ``v``; it follows every
  earlier entry of ``k``, and ``k`` gets no entry after it;
  ``c=drop``: cookie ``v`` left customer ``k``'s cookies.

A refused alias goes to ``dl:{P}`` as ``code``, ``reason``, ``w``, ``b``, and
changes nothing else. The script creates no consumer group: the worker creates
``actors`` on each stream from id 0, so it reads entries written before it.

Idempotent by messageId: a second run of the same request (coredis re-sends a
command after a connection error even when the server ran it) appends nothing
and reports every message as a duplicate. A message is a duplicate when the
same write key sent its messageId within ``window`` seconds.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from coredis import Redis

from .. import identity
from .keys import Keys
from .scripts import source

DUPLICATE: Final = "duplicate"
REFUSED: Final = "refused"
Outcome = int | Literal["duplicate", "refused"]

DIGEST_BYTES = 12  # 2**-96 per pair of ids: collisions are negligible at any volume
# A slot's ids are spread over buckets (dd:{P}:<slot>:<bucket>) so that each hash
# stays under Redis's hash-max-listpack-entries (128) and compact: about 18 bytes
# an id at 100 ids a bucket, 61 once a hash outgrows it (measured on Redis 7.0).
# 65,536 buckets keep a window of up to about 6 million ids compact; a bucket is a
# key only once an id lands in it, so a quiet project pays for what it stores.
# Fixed per project: changing it forgets the ids of the last window.
DEDUP_BUCKETS = 65_536


@dataclass(frozen=True, slots=True)
class Call:
    """One validated message of a request, reduced to what routing reads."""

    message_id: str
    alias: bool
    user_id: str | None
    cookie: str | None  # anonymousId; an alias's previousId
    body: bytes

    @classmethod
    def of(cls, message: Mapping[str, Any], body: bytes) -> Call:
        """The ids ``Identity.resolve`` reads from ``message`` (see ``segment.validate``)."""
        if message["type"] == "alias":
            return cls(message["messageId"], True, message["userId"], message["previousId"],
                       body)
        return cls(message["messageId"], False, message.get("userId"),
                   message.get("anonymousId"), body)


@dataclass(frozen=True, slots=True)
class Routed:
    """What one request came to; a duplicate was stored by an earlier request."""

    routed: int
    duplicates: int
    refused: int
    outcomes: tuple[Outcome, ...]  # per message: its customer key, or why it was not routed


def digest(write_key: str, message_id: str) -> bytes:
    """The dedup identity of a message: its messageId within its write key."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    wk = write_key.encode()
    h.update(len(wk).to_bytes(4, "big"))  # length-prefixed: no two pairs hash the same input
    h.update(wk)
    h.update(message_id.encode())
    return h.digest()


class Route:
    """``route.lua`` on one client; the script is sent once, then run by its SHA.

    ``window`` is the dedup window in seconds. Time is cut into slots of one
    window; an id is looked up in the current and the previous slot, and a
    slot's hashes expire two windows after the slot began, so an id is
    remembered for at least a window (less the clock skew between intakes).
    """

    def __init__(self, client: Redis[Any], *, window: float,
                 buckets: int = DEDUP_BUCKETS) -> None:
        if window < 0.001:
            raise ValueError(f"dedup window {window!r} s is too short for route.lua; "
                             "give at least 0.001 s")
        if buckets < 1:
            raise ValueError(f"dedup buckets must be at least 1, got {buckets}")
        self.window_ms = int(window * 1000)
        self.buckets = buckets
        self._script = client.register_script(source("route"))

    async def route(self, keys: Keys, write_key: str, calls: Sequence[Call],
                    now: float | None = None) -> Routed:
        """Route ``calls`` (one request, in order) for ``keys.project``; ``now`` in seconds."""
        if not calls:
            return Routed(0, 0, 0, ())
        now_ms = int((time.time() if now is None else now) * 1000)
        slot = now_ms // self.window_ms
        script_keys = [keys.ids, keys.registered, keys.forward, keys.next_key,
                       keys.dead_letters]
        args: list[str | bytes | int] = [
            write_key, (slot + 2) * self.window_ms - now_ms, identity.MAX_COOKIES,
            keys.partitions, keys.inbox_prefix, keys.cookies_prefix, len(calls)]
        for call in calls:
            key = digest(write_key, call.message_id)
            bucket = int.from_bytes(key[:4], "big") % self.buckets
            script_keys += [f"{keys.dedup(slot)}:{bucket}", f"{keys.dedup(slot - 1)}:{bucket}"]
            flags = ("a" if call.alias else "") + ("u" if call.user_id is not None else "") + (
                "c" if call.cookie is not None else "")
            reason = identity.alias_refused(call.cookie).reason if (
                call.alias and call.cookie is not None) else ""
            args += [key, flags, call.user_id or "", call.cookie or "", reason, call.body]
        reply: object = await self._script(script_keys, args)
        return _routed(reply, len(calls))


def _routed(reply: object, count: int) -> Routed:
    if not isinstance(reply, list) or len(reply) != 3 + count or not all(
            isinstance(value, int) for value in reply):
        raise RuntimeError(f"route.lua answered {reply!r:.200}; expected 3 + {count} integers")
    outcomes: list[Outcome] = []
    for value in reply[3:]:
        outcomes.append(DUPLICATE if value == 0 else REFUSED if value == -1 else value)
    return Routed(reply[0], reply[1], reply[2], tuple(outcomes))
