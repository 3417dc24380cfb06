"""The built-in Infinario simulator: both tracking dialects, recorded for inspection.

For tests, benchmarks and trying the router without an account. It checks what
Infinario checks (command shapes, ids, keys with ``.`` or ``$``), merges customers
the way Infinario does, answers per command by position, and can be told to fail
so the router's retries and dead letters can be exercised.

    POST /bulk                                  legacy dialect
    POST /track/v2/projects/{token}/batch       v2 dialect
    GET  /_sim/events[?project=T] | /_sim/customers[?project=T] | /_sim/stats
    POST /_sim/reset
    POST /_sim/faults {...} | DELETE /_sim/faults

It is a raw ASGI app so it runs on hypercorn's trio worker with no framework in
the hot path; ``Simulator(record=False)`` only counts, for benchmarks.
"""

from __future__ import annotations

import argparse
import heapq
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal
from urllib.parse import parse_qs

import msgspec
import trio

from .http import parse_listen, serve_asgi

MAX_COMMANDS = 50
DEFAULT_LISTEN = "127.0.0.1:8090"
RATE_WINDOW = 60.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Any, Headers]
Dialect = Literal["legacy", "v2"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

_V2_PREFIX = "/track/v2/projects/"
_V2_SUFFIX = "/batch"
_ID_KINDS = ("registered", "cookie")
_JSON = (b"content-type", b"application/json")
# Shared result objects: answering a clean batch allocates nothing per command.
_LEGACY_OK: dict[str, Any] = {"status": "ok"}
_LEGACY_RETRY: dict[str, Any] = {"status": "retry"}
_V2_OK: dict[str, Any] = {"success": True}
_FAULT_KEYS = ("fail_requests", "fail_commands", "truncate_results", "delay")


class CommandError(Exception):
    """One command is invalid; Infinario answers an error for it alone."""


@dataclass(eq=False)
class Customer:
    number: int
    registered: str | None = None
    # An insertion-ordered set: cookies are listed in the order they joined.
    cookies: dict[str, None] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    # v2 only: property key -> update_timestamp of the update that last set it.
    stamps: dict[str, float] = field(default_factory=dict)
    # (arrival number, event record), in arrival order.
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "customer": self.number,
            "ids": {"registered": self.registered, "cookies": list(self.cookies)},
            "properties": dict(self.properties),
        }


@dataclass
class Project:
    customers: dict[int, Customer] = field(default_factory=dict)
    by_registered: dict[str, Customer] = field(default_factory=dict)
    by_cookie: dict[str, Customer] = field(default_factory=dict)


@dataclass
class Faults:
    request_status: int | None = None
    request_count: int | None = None  # None: until cleared
    retry_after: float | None = None
    command_status: str | None = None
    command_count: int = 0
    truncate: int = 0
    delay: float = 0.0


class Simulator:
    """An in-memory Infinario: an ASGI app, inspected and steered with the methods below."""

    def __init__(
        self,
        *,
        record: bool = True,
        v2_auth: dict[str, str] | None = None,
        rate_limit_per_minute: int | None = None,
        max_commands: int = MAX_COMMANDS,
    ) -> None:
        if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
            raise ValueError(f"rate_limit_per_minute must be at least 1, "
                             f"got {rate_limit_per_minute}")
        if max_commands < 1:
            raise ValueError(f"max_commands must be at least 1, got {max_commands}")
        self.record = record
        self.v2_auth = v2_auth
        self.rate_limit = rate_limit_per_minute
        self.max_commands = max_commands
        self.reset()

    # --- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every record, count and fault, as a fresh simulator."""
        self.events: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.projects: dict[str, Project] = {}
        self.counts: Counter[str] = Counter()
        self.events_by_type: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.faults = Faults()
        # Trio times of the requests inside the rate-limit window, oldest first.
        self._recent: deque[float] = deque()
        self._next_customer = 1

    def stats(self) -> dict[str, Any]:
        return {
            **{k: self.counts[k] for k in ("requests", "commands", "events", "customer_updates",
                                           "errors", "retries")},
            "by_status": {str(k): v for k, v in sorted(self.statuses.items())},
            "events_by_type": dict(self.events_by_type),
            "customers": sum(len(p.customers) for p in self.projects.values()),
            "record": self.record,
            "time": time.time(),
        }

    def customers(self, project: str) -> list[dict[str, Any]]:
        found = self.projects.get(project)
        return [c.view() for c in found.customers.values()] if found else []

    def _resolve(self, project: str, registered: str | None, cookie: str | None
                 ) -> Customer | None:
        found = self.projects.get(project)
        if found is None:
            return None
        customer = found.by_registered.get(registered) if registered is not None else None
        if customer is None and cookie is not None:
            customer = found.by_cookie.get(cookie)
        return customer

    def find_customer(self, project: str, registered: str | None = None,
                      cookie: str | None = None) -> dict[str, Any] | None:
        """The customer one of these ids belongs to now (registered looked up first)."""
        customer = self._resolve(project, registered, cookie)
        return customer.view() if customer else None

    def events_of(self, project: str, registered: str | None = None,
                  cookie: str | None = None) -> list[dict[str, Any]]:
        """Events of the customer the id resolves to now, merged ones included, in arrival
        order."""
        customer = self._resolve(project, registered, cookie)
        return [event for _, event in customer.events] if customer else []

