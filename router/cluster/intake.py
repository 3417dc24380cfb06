"""The stateless intake of the Redis Streams mode: one ``route.lua`` run per request.

The HTTP server and its validation are the embedded relay's (``router/intake.py``);
only the step that makes a request durable differs. Here it is ``route.lua``:
messageId dedup, identity and the append to each customer's partition stream in
one atomic step, and the 200 goes out after its reply. Redis answers only once
its append-only file is on disk (``appendfsync always``), so a 200 means the
messages survive a crash of Redis or of this host.

Any doubt about the outcome (Redis down, a timeout, a connection lost mid-call)
is a 503 with ``Retry-After``: the client resends, and the dedup in the script
drops whatever the first attempt did store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import coredis
import msgspec
import structlog
import trio
from coredis.exceptions import RedisError

from ..intake import Accepted, Overloaded
from ..metrics import Metrics
from ..segment import TIME_KEY, Item, with_time
from .keys import Keys
from .route import REFUSED, Call, Route

log = structlog.get_logger("router.cluster.intake")

ROUTE_TIMEOUT = 5.0  # seconds a request waits for Redis before the client is told to retry
_encode = msgspec.json.Encoder().encode


class ClusterIntake:
    """Makes validated requests durable in Redis; the HTTP intake's ``accept``."""

    def __init__(self, client: coredis.Redis[bytes], *, write_keys: dict[str, str],
                 partitions: int, dedup_window: float, metrics: Metrics,
                 timeout: float = ROUTE_TIMEOUT) -> None:
        self.write_keys = write_keys
        self.metrics = metrics
        self.timeout = timeout
        self._route = Route(client, window=dedup_window)
        self._keys = {project: Keys(project, partitions) for project in set(write_keys.values())}
        self.unavailable: str | None = None  # why the last request could not reach Redis

    async def accept(
        self, write_key: str, messages: Sequence[dict[str, Any]], items: Sequence[Item],
        shared: bytes | None, now: float,
    ) -> Accepted:
        keys = self._keys[self.write_keys[write_key]]
        if shared is None:
            # Each stream entry is read alone, so it carries its event time.
            calls = [Call.of(m, with_time(item, m[TIME_KEY]))
                     for m, item in zip(messages, items, strict=True)]
        else:
            # The partition worker reads each message alone: its stream entry holds
            # the batch's shared context merged in.
            calls = [Call.of(m, _encode(m)) for m in messages]
        try:
            with trio.fail_after(self.timeout):
                routed = await self._route.route(keys, write_key, calls, now=now)
        except (RedisError, OSError, trio.TooSlowError) as exc:
            reason = str(exc) or type(exc).__name__
            if self.unavailable is None:
                log.error("redis unavailable; answering 503", error=reason)
            self.unavailable = reason
            raise Overloaded("redis is unavailable", code="storage_unavailable") from None
        if self.unavailable is not None:
            log.info("redis reachable again")
            self.unavailable = None
        accepted = routed.routed + routed.refused  # refused aliases are dead letters, kept
        if routed.duplicates:
            self.metrics.inc("messages_duplicate_total", routed.duplicates)
        if accepted:
            self.metrics.inc("messages_accepted_total", accepted)
        if routed.refused:
            self.metrics.inc("messages_refused_total", routed.refused, reason="alias_registered")
            self.metrics.inc("dead_letters_total", routed.refused, reason="refused")
            for message, outcome in zip(messages, routed.outcomes, strict=True):
                if outcome == REFUSED:
                    log.warning("message refused", code="alias_registered",
                                message_id=message.get("messageId"))
        return Accepted(accepted, routed.duplicates)
