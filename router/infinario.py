"""The two Infinario wire dialects: encode requests, read per-command results.

Pure (no I/O), like h11: the sender does the HTTP and asks a dialect what the
answer means.

    legacy  POST {base}/bulk                                    crm/events, crm/customers
    v2      POST {base}/track/v2/projects/{token}/batch         customers/events, customers
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec

from .commands import Command
from .concat import join_wrapped

MAX_COMMANDS = 50

Outcome = Literal["ok", "retry", "error"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


# The wire shapes: each command is encoded once, when it is committed to the outbox.


class _LegacyEvent(msgspec.Struct, gc=False):
    customer_ids: dict[str, str]
    project_id: str
    type: str | None
    properties: dict[str, Any]
    timestamp: float


class _LegacyCustomer(msgspec.Struct, gc=False):
    ids: dict[str, str]
    project_id: str
    properties: dict[str, Any]


class _V2Event(msgspec.Struct, gc=False):
    customer_ids: dict[str, str]
    event_type: str | None
    timestamp: float
    properties: dict[str, Any]


class _V2Customer(msgspec.Struct, gc=False):
    customer_ids: dict[str, str]
    properties: dict[str, Any]
    update_timestamp: float


class _Named(msgspec.Struct, gc=False):
    name: str
    data: _LegacyEvent | _LegacyCustomer | _V2Event | _V2Customer


class _Wire(msgspec.Struct):
    """Any dialect's command, read back (dead letters, a changed dialect)."""

    name: str
    data: dict[str, Any]


_wire_decoder = msgspec.json.Decoder(_Wire)


def join_body(commands: Sequence[bytes]) -> bytes:
    """A request body from its commands' wire bytes (both dialects share the envelope)."""
    return join_wrapped(b'{"commands":[', commands, b"]}")


@dataclass(frozen=True, slots=True)
class Result:
    """Infinario's answer for one command."""

    outcome: Outcome
    errors: tuple[str, ...] = ()


OK = Result("ok")
_RETRY = Result("retry")
# The legacy answer for an accepted command, as decoded: when every item is
# exactly this, one C-level count reads the whole answer.
_LEGACY_OK = {"status": "ok"}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a whole HTTP answer means.

    ``results`` is set when the request was processed (one per command; a
    missing tail is filled with ``retry``). Otherwise ``retry`` says whether to
    send the whole request again, ``auth`` marks bad credentials, and
    ``retry_after`` carries the server's ``Retry-After`` in seconds.
    """

    results: tuple[Result, ...] | None = None
    retry: bool = False
    auth: bool = False
    retry_after: float | None = None
    reason: str = ""


class Dialect(Protocol):
    name: str

    def url(self, base: str, project: str) -> str: ...

    def encode(self, command: Command) -> bytes:
        """One command's wire form, the unit a request body joins."""

    def decode(self, wire: bytes, project: str) -> Command:
        """A command back from its wire form (``project``: the row's, which v2 omits)."""

    def headers(self, project: str) -> dict[str, str]: ...

    def verdict(
        self, status: int, body: bytes, count: int, retry_after: str | None
    ) -> Verdict: ...


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, min(float(value), 3600.0))
    except ValueError:
        return None


def _transport_verdict(status: int, body: bytes, retry_after: str | None) -> Verdict | None:
    """Statuses whose meaning is the same in both dialects."""
    if status == 429 or status >= 500:
        return Verdict(retry=True, retry_after=parse_retry_after(retry_after),
                       reason=f"HTTP {status}")
    return None


def _fill(results: list[Result], count: int) -> tuple[Result, ...]:
    # A result missing at the tail means Infinario did not get to that command.
    if len(results) < count:
        results = results + [Result("retry", ("no result returned",))] * (count - len(results))
    return tuple(results[:count])


def _errors(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(e) for e in value)
    if value is None:
        return ()
    return (str(value),)


class Legacy:
    """The legacy Infinario tracking API: ``/bulk``, project token in every command."""

    name = "legacy"

    def url(self, base: str, project: str) -> str:
        return base.rstrip("/") + "/bulk"

    def headers(self, project: str) -> dict[str, str]:
        return {"Content-Type": "application/json"}

    def encode(self, command: Command) -> bytes:
        c = command
        if c.kind == "event":
            return _encode(_Named("crm/events", _LegacyEvent(
                c.ids, c.project, c.event_type, c.properties, c.timestamp)))
        return _encode(_Named("crm/customers", _LegacyCustomer(c.ids, c.project, c.properties)))

    def decode(self, wire: bytes, project: str) -> Command:
        named = _wire_decoder.decode(wire)
        data = named.data
        if named.name == "crm/events":
            return Command("event", data.get("project_id", project), data["customer_ids"],
                           data["properties"], data["timestamp"], data.get("type"))
        return Command("customer", data.get("project_id", project), data["ids"],
                       data["properties"], 0.0)

    def verdict(self, status: int, body: bytes, count: int, retry_after: str | None) -> Verdict:
        transport = _transport_verdict(status, body, retry_after)
        if transport is not None:
            return transport
        if status != 200:
            return Verdict(reason=f"HTTP {status}: {body[:200].decode(errors='replace')}")
        try:
            data = _decode(body)
            raw = data["results"]
            assert isinstance(raw, list)
        except Exception:
            return Verdict(retry=True, reason="unreadable answer from Infinario")
        if raw.count(_LEGACY_OK) == len(raw):
            return Verdict(results=_fill([OK] * len(raw), count))
        results = []
        for item in raw:
            status_text = item.get("status") if isinstance(item, dict) else None
            if status_text == "ok":
                results.append(OK)
            elif status_text == "retry":
                results.append(_RETRY)
            else:
                errors = _errors(item.get("errors") if isinstance(item, dict) else item)
                results.append(Result("error", errors or (f"status {status_text!r}",)))
        return Verdict(results=_fill(results, count))


class V2:
    """Bloomreach Engagement tracking API v2: one project per request, auth header."""

    name = "v2"

    def __init__(self, auth: dict[str, str | None]) -> None:
        # project token -> Authorization header value (None: not configured)
        self.auth = auth

    def url(self, base: str, project: str) -> str:
        return f"{base.rstrip('/')}/track/v2/projects/{project}/batch"

    def headers(self, project: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        value = self.auth.get(project)
        if value:
            headers["Authorization"] = value
        return headers

    def encode(self, command: Command) -> bytes:
        c = command
        if c.kind == "event":
            return _encode(_Named("customers/events", _V2Event(
                c.ids, c.event_type, c.timestamp, c.properties)))
        # Commands in one v2 batch run in no guaranteed order: update_timestamp
        # keeps an older update from winning.
        return _encode(_Named("customers", _V2Customer(c.ids, c.properties, c.timestamp)))

    def decode(self, wire: bytes, project: str) -> Command:
        named = _wire_decoder.decode(wire)
        data = named.data
        if named.name == "customers/events":
            return Command("event", project, data["customer_ids"], data["properties"],
                           data["timestamp"], data.get("event_type"))
        return Command("customer", project, data["customer_ids"], data["properties"],
                       data.get("update_timestamp", 0.0))

    def verdict(self, status: int, body: bytes, count: int, retry_after: str | None) -> Verdict:
        transport = _transport_verdict(status, body, retry_after)
        if transport is not None:
            return transport
        try:
            data = _decode(body)
        except Exception:
            data = None
        if status != 200:
            text = body[:300].decode(errors="replace")
            if status in (400, 401, 403) and "authenticate" in text.lower():
                return Verdict(auth=True, reason=f"HTTP {status}: Could not authenticate")
            if status in (401, 403):
                return Verdict(auth=True, reason=f"HTTP {status}: {text}")
            return Verdict(reason=f"HTTP {status}: {text}")
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            return Verdict(retry=True, reason="unreadable answer from Infinario")
        results = []
        for item in data["results"]:
            if isinstance(item, dict) and item.get("success") is True:
                results.append(OK)
            else:
                errors = _errors(item.get("errors") if isinstance(item, dict) else item)
                results.append(Result("error", errors or ("success: false",)))
        return Verdict(results=_fill(results, count))
