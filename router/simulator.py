"""The built-in Infinario simulator: both tracking dialects, recorded for inspection.

For tests, benchmarks and trying the router without an account. It checks what
Infinario checks (command shapes, ids, keys with ``.`` or ``$``), merges customers
the way Infinario does, answers per command by position, and can be told to fail
so the router's retries and dead letters can be exercised.

    POST /bulk                                  legacy dialect
    POST /track/v2/projects/{token}/batch       v2 dialect
    POST /NAME/bulk, /NAME/track/v2/...          the same, sent by NAME (see ``received``)
    GET  /_sim/events[?project=T] | /_sim/customers[?project=T] | /_sim/stats
    GET  /_sim/received[?start=N&limit=M]       every command processed, in arrival order
    POST /_sim/reset
    POST /_sim/faults {...} | DELETE /_sim/faults

It is a ``router.server`` handler, served by the relay's own HTTP server with no
framework in the hot path; ``Simulator(record=False)`` only counts, for benchmarks.
"""

from __future__ import annotations

import argparse
import heapq
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal
from urllib.parse import parse_qs

import msgspec
import trio

from .config import parse_listen
from .errors import StartupError
from .server import Request, RequestHead, Response, Route, serve

MAX_COMMANDS = 50
DEFAULT_LISTEN = "127.0.0.1:8090"
RATE_WINDOW = 60.0

Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Any, Headers]
Dialect = Literal["legacy", "v2"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

_V2_PREFIX = "/track/v2/projects/"
_V2_SUFFIX = "/batch"
_ID_KINDS = ("registered", "cookie")
# Far above any real tracking request: the relay posts at most MAX_COMMANDS commands.
MAX_BODY_BYTES = 16 * 1024 * 1024
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
    """An in-memory Infinario: an HTTP handler, inspected and steered with the methods below."""

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
        self._read_all = Route(MAX_BODY_BYTES, self._handle)
        self.reset()

    # --- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every record, count and fault, as a fresh simulator."""
        self.events: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        # Every command a tracking request carried, in the order processed (``record``
        # only): its position ``n``, the request's number and wall time, the sender's
        # path prefix ``via`` ("" without one), the command and its result status.
        self.received: list[dict[str, Any]] = []
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

    # --- faults ------------------------------------------------------------------------------

    def fail_requests(self, status: int, count: int | None = None,
                      retry_after: float | None = None) -> None:
        """Answer the next ``count`` tracking requests (None: until cleared) with ``status``,
        dropping their data."""
        _check_request_fault(status, count, retry_after)
        self.faults.request_status = None if count == 0 else status
        self.faults.request_count = count
        self.faults.retry_after = retry_after

    def fail_commands(self, status: str, count: int) -> None:
        """Answer the next ``count`` commands ``retry`` or ``error`` instead of applying them."""
        _check_command_fault(status, count)
        self.faults.command_status = status if count else None
        self.faults.command_count = count

    def truncate_results(self, count: int) -> None:
        """Leave the last ``count`` results out of the next answer, without applying them."""
        _check_not_negative("truncate_results", count)
        self.faults.truncate = count

    def set_delay(self, seconds: float) -> None:
        """Wait ``seconds`` before every tracking answer."""
        _check_not_negative("delay", seconds)
        self.faults.delay = seconds

    def clear_faults(self) -> None:
        self.faults = Faults()

    def apply_faults(self, spec: Any) -> None:
        """Set faults from a ``POST /_sim/faults`` body; when any part is bad nothing changes."""
        if not isinstance(spec, dict) or not spec:
            raise ValueError('faults must be a non-empty JSON object, e.g. {"delay": 0.05}')
        unknown = [key for key in spec if key not in _FAULT_KEYS]
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r}; use one of {', '.join(_FAULT_KEYS)}")
        # Everything is parsed and checked before anything is set.
        actions: list[Callable[[], None]] = []
        if "fail_requests" in spec:
            f = _fault_object(spec, "fail_requests", ("status", "count", "retry_after"))
            status = _fault_int(f.get("status"), "fail_requests.status")
            count = None if f.get("count") is None else _fault_int(
                f["count"], "fail_requests.count")
            retry_after = None if f.get("retry_after") is None else _fault_number(
                f["retry_after"], "fail_requests.retry_after")
            _check_request_fault(status, count, retry_after)
            actions.append(lambda: self.fail_requests(status, count, retry_after))
        if "fail_commands" in spec:
            f = _fault_object(spec, "fail_commands", ("status", "count"))
            command_status = f.get("status")
            if not isinstance(command_status, str):
                raise ValueError('fail_commands.status must be "retry" or "error"')
            command_count = _fault_int(f.get("count"), "fail_commands.count")
            _check_command_fault(command_status, command_count)
            actions.append(lambda: self.fail_commands(command_status, command_count))
        if "truncate_results" in spec:
            truncate = _fault_int(spec["truncate_results"], "truncate_results")
            _check_not_negative("truncate_results", truncate)
            actions.append(lambda: self.truncate_results(truncate))
        if "delay" in spec:
            delay = _fault_number(spec["delay"], "delay")
            _check_not_negative("delay", delay)
            actions.append(lambda: self.set_delay(delay))
        for action in actions:
            action()

    # --- serving ---------------------------------------------------------------------------

    def answered(self, status: int, head: RequestHead | None) -> None:
        """The simulator keeps its own counts (``stats``)."""

    def route(self, head: RequestHead) -> Route:
        """Every endpoint reads its (small) body: answers are decided once it is in."""
        return self._read_all

    async def _handle(self, request: Request) -> Response:
        status, payload, headers = await self._route(request.head, request.body)
        return Response(status, _encode(payload), headers=headers)

    async def _route(self, head: RequestHead, body: bytes) -> Answer:
        method = head.method
        via, path = _sender(head.path)
        if path == "/bulk":
            if method != "POST":
                return _not_allowed(method, head.path, "POST")
            return await self._track("legacy", head.path, "", head, body, via)
        if path.startswith(_V2_PREFIX) and path.endswith(_V2_SUFFIX):
            token = path[len(_V2_PREFIX):-len(_V2_SUFFIX)]
            if token and "/" not in token:
                if method != "POST":
                    return _not_allowed(method, head.path, "POST")
                return await self._track("v2", head.path, token, head, body, via)
        return self._control(method, head.path, head, body)

    def _control(self, method: str, path: str, head: RequestHead, body: bytes) -> Answer:
        query = parse_qs(head.query)
        project = query["project"][-1] if "project" in query else None
        if path == "/":
            if method != "GET":
                return _not_allowed(method, path, "GET")
            return 200, {**_SUMMARY, "record": self.record}, []
        if path == "/_sim/events":
            if method != "GET":
                return _not_allowed(method, path, "GET")
            if project is None:
                return 200, self.events, []
            return 200, [e for e in self.events if e["project"] == project], []
        if path == "/_sim/customers":
            if method != "GET":
                return _not_allowed(method, path, "GET")
            projects = list(self.projects) if project is None else [project]
            return 200, [{**c, "project": p} for p in projects for c in self.customers(p)], []
        if path == "/_sim/stats":
            if method != "GET":
                return _not_allowed(method, path, "GET")
            return 200, self.stats(), []
        if path == "/_sim/received":
            if method != "GET":
                return _not_allowed(method, path, "GET")
            try:
                start = int(query.get("start", ["0"])[-1])
                limit = int(query["limit"][-1]) if "limit" in query else None
            except ValueError:
                return 400, _failure("start and limit must be whole numbers"), []
            if start < 0 or (limit is not None and limit < 0):
                return 400, _failure("start and limit must be 0 or more"), []
            end = None if limit is None else start + limit
            return 200, self.received[start:end], []
        if path == "/_sim/reset":
            if method != "POST":
                return _not_allowed(method, path, "POST")
            self.reset()
            return 200, {"success": True}, []
        if path == "/_sim/faults":
            if method == "GET":
                return 200, self.faults, []
            if method == "DELETE":
                self.clear_faults()
                return 200, {"success": True}, []
            if method == "POST":
                try:
                    self.apply_faults(_decode(body))
                except (msgspec.DecodeError, ValueError) as exc:
                    return 400, _failure(f"bad fault spec: {exc}"), []
                return 200, {"success": True, "faults": self.faults}, []
            return _not_allowed(method, path, "GET, POST, DELETE")
        return 404, _failure(f"no endpoint {method} {path}; GET / lists the endpoints"), []

    # --- tracking requests -------------------------------------------------------------------

    async def _track(self, dialect: Dialect, path: str, token: str, head: RequestHead,
                     body: bytes, via: str = "") -> Answer:
        delay = self.faults.delay
        if delay > 0:
            await trio.sleep(delay)
        status, payload, headers, commands = self._batch(dialect, token, head, body, via)
        self.counts["requests"] += 1
        self.statuses[status] += 1
        if self.record:
            self.requests.append(
                {"path": path, "dialect": dialect, "commands": commands, "status": status})
        return status, payload, headers

    def _batch(self, dialect: Dialect, token: str, head: RequestHead, body: bytes, via: str = ""
               ) -> tuple[int, Any, Headers, int]:
        """One tracking request: (status, answer, extra headers, commands in the body)."""
        try:
            data = _decode(body)
            problem = ""
        except msgspec.DecodeError as exc:
            data = None
            problem = f"request body is not JSON: {exc}"
        commands = data.get("commands") if isinstance(data, dict) else None
        count = len(commands) if isinstance(commands, list) else 0
        # Infinario's order: rate limit, then credentials, then the body.
        if self.rate_limit is not None and not self._admit(self.rate_limit):
            return 429, _failure(f"rate limit of {self.rate_limit} requests per minute "
                                 "exceeded; the data was dropped"), [(b"retry-after", b"1")], count
        failed = self._request_fault()
        if failed is not None:
            return failed[0], failed[1], failed[2], count
        if dialect == "v2" and not self._authenticated(token, head):
            return 400, _failure("Could not authenticate"), [], count
        if not isinstance(commands, list):
            return 400, _failure(problem or 'request body must be {"commands": [...]}'), [], count
        if count > self.max_commands:
            return 400, _failure(f"{count} commands in one request; "
                                 f"send at most {self.max_commands}"), [], count
        return 200, {"success": True, "results": self._commands(dialect, token, commands, via)}, \
            [], count

    def _admit(self, limit: int) -> bool:
        """Whether one more request fits the sliding window; only admitted ones count."""
        now = _clock()
        recent = self._recent
        while recent and recent[0] <= now - RATE_WINDOW:
            recent.popleft()
        if len(recent) >= limit:
            return False
        recent.append(now)
        return True

    def _request_fault(self) -> Answer | None:
        faults = self.faults
        status = faults.request_status
        if status is None:
            return None
        if faults.request_count is not None:
            faults.request_count -= 1
            if faults.request_count <= 0:
                faults.request_status = None
        headers: Headers = []
        if faults.retry_after is not None:
            headers.append((b"retry-after", f"{faults.retry_after:g}".encode()))
        return status, _failure("simulated failure"), headers

    def _authenticated(self, token: str, head: RequestHead) -> bool:
        raw = head.headers.get(b"authorization")
        header = None if raw is None else raw.decode("latin-1")
        if header is None:
            return False
        if self.v2_auth is None:
            return header.startswith(("Token ", "Basic "))
        return header == self.v2_auth.get(token)

    def _commands(self, dialect: Dialect, token: str, commands: list[Any], via: str = ""
                  ) -> list[dict[str, Any]]:
        faults = self.faults
        keep = len(commands) - min(faults.truncate, len(commands))
        faults.truncate = 0
        if keep < len(commands):
            commands = commands[:keep]
        self.counts["commands"] += keep
        legacy = dialect == "legacy"
        ok = _LEGACY_OK if legacy else _V2_OK
        results: list[dict[str, Any]] = []
        append = results.append
        errors = 0
        for command in commands:
            if faults.command_count:
                append(self._command_fault(legacy))
                continue
            try:
                if legacy:
                    self._legacy(command)
                else:
                    self._v2(token, command)
            except CommandError as exc:
                errors += 1
                append(_error_result(legacy, str(exc)))
            else:
                append(ok)
        if errors:
            self.counts["errors"] += errors
        if self.record:
            self._note(commands, results, via)
        return results

    def _note(self, commands: list[Any], results: list[dict[str, Any]], via: str) -> None:
        """Add one request's processed commands to ``received``."""
        received = self.received
        request = self.counts["requests"] + 1  # counted once the request is answered
        at = time.time()
        for command, result in zip(commands, results, strict=True):
            name = command.get("name") if isinstance(command, dict) else None
            data = command.get("data") if isinstance(command, dict) else None
            status = result.get("status")
            if status is None:  # v2 results say success or not
                status = "ok" if result.get("success") else "error"
            received.append({"n": len(received), "request": request, "at": at, "via": via,
                             "name": name, "data": data, "result": status})

    def _command_fault(self, legacy: bool) -> dict[str, Any]:
        faults = self.faults
        faults.command_count -= 1
        status = faults.command_status
        if faults.command_count == 0:
            faults.command_status = None
        if status == "retry" and legacy:
            self.counts["retries"] += 1
            return _LEGACY_RETRY
        self.counts["errors"] += 1
        # v2 has no retry status: Bloomreach answers a failure either way.
        return _error_result(legacy, f"simulated {status}")

    # --- commands ----------------------------------------------------------------------------

    def _legacy(self, command: Any) -> None:
        name, data = _parts(command)
        if name == "crm/events":
            if "customer_ids" not in data and "ids" in data:
                raise CommandError("crm/events takes customer_ids, not ids")
            ids = _ids(data, "customer_ids")
            project = _string(data, "project_id")
            event_type = _string(data, "type")
            properties = _properties(data)
            timestamp = _number(data, "timestamp")
            self._event(project, ids, event_type, properties, timestamp)
        elif name == "crm/customers":
            if "customer_ids" in data:
                raise CommandError("crm/customers takes ids, not customer_ids")
            ids = _ids(data, "ids")
            project = _string(data, "project_id")
            self._update(project, ids, _properties(data), None)
        else:
            raise CommandError(f"unknown command {name!r}; /bulk takes crm/events "
                               "or crm/customers")

    def _v2(self, project: str, command: Any) -> None:
        name, data = _parts(command)
        if name == "customers/events":
            ids = _ids(data, "customer_ids")
            event_type = _string(data, "event_type")
            properties = _properties(data)
            timestamp = _number(data, "timestamp")
            self._event(project, ids, event_type, properties, timestamp)
        elif name == "customers":
            ids = _ids(data, "customer_ids")
            properties = _properties(data)
            stamp = _number(data, "update_timestamp")
            self._update(project, ids, properties, stamp)
        else:
            raise CommandError(f"unknown command {name!r}; a v2 batch takes customers "
                               "or customers/events")

    def _event(self, project: str, ids: dict[str, str], event_type: str,
               properties: dict[str, Any], timestamp: float) -> None:
        self.counts["events"] += 1
        self.events_by_type[event_type] += 1
        if not self.record:
            return
        customer = self._identify(project, ids)
        event = {"project": project, "customer_ids": ids, "type": event_type,
                 "properties": properties, "timestamp": timestamp,
                 "customer": customer.number}
        customer.events.append((len(self.events), event))
        self.events.append(event)

    def _update(self, project: str, ids: dict[str, str], properties: dict[str, Any],
                stamp: float | None) -> None:
        self.counts["customer_updates"] += 1
        if not self.record:
            return
        customer = self._identify(project, ids)
        if stamp is None:
            # Legacy updates apply in the order they arrive.
            customer.properties.update(properties)
            return
        # v2 runs a batch's commands in any order: an older update never wins a key.
        stamps = customer.stamps
        for key, value in properties.items():
            if stamps.get(key, -1e308) > stamp:
                continue
            stamps[key] = stamp
            customer.properties[key] = value

    # --- identity ----------------------------------------------------------------------------

    def _identify(self, project_token: str, ids: dict[str, str]) -> Customer:
        """Find or create the customer for these ids, merging the way Infinario does."""
        project = self.projects.get(project_token)
        if project is None:
            project = self.projects[project_token] = Project()
        registered = ids.get("registered")
        cookie = ids.get("cookie")
        by_registered = project.by_registered.get(registered) if registered else None
        by_cookie = project.by_cookie.get(cookie) if cookie else None
        if by_registered is None:
            if by_cookie is None:
                return self._new_customer(project, registered, cookie)
            if registered is None:
                return by_cookie
            if by_cookie.registered is None:
                # An anonymous customer identifies: it takes the registered id.
                by_cookie.registered = registered
                project.by_registered[registered] = by_cookie
                return by_cookie
            # A shared device: a new registered customer takes the cookie over.
            assert cookie is not None  # by_cookie was found by it
            customer = self._new_customer(project, registered, None)
            _move_cookie(project, cookie, by_cookie, customer)
            return customer
        if by_cookie is None:
            if cookie:
                by_registered.cookies[cookie] = None
                project.by_cookie[cookie] = by_registered
            return by_registered
        if by_cookie is not by_registered:
            assert cookie is not None  # by_cookie was found by it
            if by_cookie.registered is None:
                _merge(project, by_cookie, by_registered)
            else:
                # Two registered customers are never merged: the device changes hands.
                _move_cookie(project, cookie, by_cookie, by_registered)
        return by_registered

    def _new_customer(self, project: Project, registered: str | None, cookie: str | None
                      ) -> Customer:
        customer = Customer(self._next_customer, registered=registered)
        self._next_customer += 1
        project.customers[customer.number] = customer
        if registered:
            project.by_registered[registered] = customer
        if cookie:
            customer.cookies[cookie] = None
            project.by_cookie[cookie] = customer
        return customer


def _sender(path: str) -> tuple[str, str]:
    """A tracking path with a one-segment prefix, ``/NAME/bulk``, is ``/bulk`` sent by NAME
    (so is ``/NAME/track/v2/...``): several relays pointed at one simulator are told apart
    in ``received``. Returns (NAME or "", the path without it)."""
    if path.startswith(("/_sim/", _V2_PREFIX)) or path.count("/") < 2:
        return "", path
    name, _, rest = path[1:].partition("/")
    rest = "/" + rest
    if name and (rest == "/bulk" or rest.startswith(_V2_PREFIX)):
        return name, rest
    return "", path


def _merge(project: Project, source: Customer, target: Customer) -> None:
    """Fold anonymous ``source`` into ``target``; ``target``'s property values win."""
    for cookie in source.cookies:
        target.cookies[cookie] = None
        project.by_cookie[cookie] = target
    for key, value in source.properties.items():
        if key not in target.properties:
            target.properties[key] = value
            if key in source.stamps:
                target.stamps[key] = source.stamps[key]
    for _, event in source.events:
        event["customer"] = target.number
    target.events = list(heapq.merge(target.events, source.events, key=itemgetter(0)))
    del project.customers[source.number]


def _move_cookie(project: Project, cookie: str, source: Customer, target: Customer) -> None:
    source.cookies.pop(cookie, None)
    target.cookies[cookie] = None
    project.by_cookie[cookie] = target


# --- command checks --------------------------------------------------------------------------


def _parts(command: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(command, dict):
        raise CommandError('a command must be an object {"name": ..., "data": {...}}')
    name = command.get("name")
    if not isinstance(name, str):
        raise CommandError("a command needs a name string")
    data = command.get("data")
    if not isinstance(data, dict):
        raise CommandError(f"command {name!r} needs a data object")
    return name, data


def _string(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if isinstance(value, str) and value:
        return value
    if value is None:
        raise CommandError(f"{key} is missing")
    raise CommandError(f"{key} must be a non-empty string")


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return float(value)
    if value is None:
        raise CommandError(f"{key} is missing")
    raise CommandError(f"{key} must be a number of seconds")


def _ids(data: dict[str, Any], key: str) -> dict[str, str]:
    ids = data.get(key)
    if ids is None:
        raise CommandError(f"{key} is missing")
    if not isinstance(ids, dict) or not ids:
        raise CommandError(f"{key} must be an object with a registered and/or cookie id")
    for kind, value in ids.items():
        if kind not in _ID_KINDS:
            raise CommandError(f"{key} has unknown id {kind!r}; use registered and/or cookie")
        if not isinstance(value, str) or not value:
            raise CommandError(f"{key}.{kind} must be a non-empty string")
    return ids


def _properties(data: dict[str, Any]) -> dict[str, Any]:
    properties = data.get("properties")
    if not isinstance(properties, dict):
        raise CommandError("properties must be an object")
    # One join and two substring searches in C; the per-key loop runs only on a hit.
    joined = "".join(properties)
    if "." in joined or "$" in joined:
        for key in properties:
            if "." in key or "$" in key:
                raise CommandError(f"property key {key!r} contains '.' or '$'")
    return properties


def _error_result(legacy: bool, message: str) -> dict[str, Any]:
    if legacy:
        return {"status": "error", "errors": [message]}
    return {"success": False, "errors": [message]}


def _failure(message: str) -> dict[str, Any]:
    return {"success": False, "errors": [message]}


def _not_allowed(method: str, path: str, allow: str) -> Answer:
    return 405, _failure(f"{method} {path} is not supported; use {allow}"), \
        [(b"allow", allow.encode())]


# --- fault checks ----------------------------------------------------------------------------


def _check_request_fault(status: int, count: int | None, retry_after: float | None) -> None:
    if not 100 <= status <= 599:
        raise ValueError(f"fail_requests status must be an HTTP status (100-599), got {status}")
    if count is not None:
        _check_not_negative("fail_requests count", count)
    if retry_after is not None:
        _check_not_negative("fail_requests retry_after", retry_after)


def _check_command_fault(status: str, count: int) -> None:
    if status not in ("retry", "error"):
        raise ValueError(f"fail_commands status must be 'retry' or 'error', got {status!r}")
    _check_not_negative("fail_commands count", count)


def _check_not_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}")


def _fault_object(spec: dict[str, Any], key: str, fields: tuple[str, ...]) -> dict[str, Any]:
    value = spec[key]
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object with {', '.join(fields)}")
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ValueError(f"{key} has unknown field {unknown[0]!r}; use {', '.join(fields)}")
    return value


def _fault_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _fault_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


# The rate-limit window follows wall-clock monotonic time rather than trio's
# clock, which starts anew (at a random offset) in every trio.run.
_clock = time.monotonic

_SUMMARY: dict[str, Any] = {
    "simulator": "infinario-router's built-in Infinario: an in-memory stand-in for the "
                 "tracking API, for tests, benchmarks and trying the router without an account",
    "tracking": {"legacy": "POST /bulk", "v2": "POST /track/v2/projects/{token}/batch"},
    "inspect": ["GET /_sim/events?project=TOKEN", "GET /_sim/customers?project=TOKEN",
                "GET /_sim/received?start=N&limit=M", "GET /_sim/stats", "GET /_sim/faults"],
    "control": ['POST /_sim/faults {"fail_requests": {"status": 503, "count": 3}}',
                "DELETE /_sim/faults", "POST /_sim/reset"],
}


# --- running ---------------------------------------------------------------------------------


async def run_simulator(
    sim: Simulator, host: str, port: int,
    *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until cancelled; ``task_status`` gets its base URL."""
    await serve(sim, host, port, task_status=task_status)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {value!r}")
    return seconds


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None, prog: str = "python -m router.simulator") -> int:
    from .cli import ShortParser

    parser = ShortParser(
        prog=prog,
        description="Run the built-in Infinario simulator (legacy /bulk and v2 batch).")
    parser.add_argument("--listen", default=DEFAULT_LISTEN,
                        help=f"HOST:PORT to listen on ({DEFAULT_LISTEN})")
    parser.add_argument("--counting", action="store_true",
                        help="only count, keep no events or customers (for benchmarks)")
    parser.add_argument("--delay", type=_seconds, default=0.0,
                        help="seconds to wait before every tracking answer")
    parser.add_argument("--rate-limit", type=_positive, metavar="N",
                        help="answer 429 past N tracking requests a minute")
    args = parser.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    sim = Simulator(record=not args.counting, rate_limit_per_minute=args.rate_limit)
    sim.set_delay(args.delay)

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(run_simulator, sim, host, port)
                print(f"simulator: listening on {url} (see {url}/)", file=sys.stderr, flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        pass
    except (OSError, StartupError, BaseExceptionGroup) as exc:
        error = _os_error(exc)
        if error is None:
            raise
        print(f"simulator: cannot listen on {args.listen}: {error}", file=sys.stderr)
        return 1
    return 0


def _os_error(exc: BaseException) -> OSError | StartupError | None:
    """The listening error (a port in use, a bad address) inside trio's nested exception
    groups."""
    if isinstance(exc, OSError | StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    raise SystemExit(main())
