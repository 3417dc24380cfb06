"""The built-in Infinario simulator: both tracking dialects, recorded for inspection.

For tests, benchmarks and trying the router without an account. It checks what
Infinario checks (command shapes, ids, keys with ``.`` or ``$``), merges customers
the way Infinario does, answers per command by position, and can be told to fail
so the router's retries and dead letters can be exercised.

    POST /bulk                                  legacy dialect
    POST /track/v2/projects/{token}/batch       v2 dialect
    GET  /_sim/events | /_sim/customers?project=T | /_sim/stats
    POST /_sim/reset
    POST /_sim/faults {...} | DELETE /_sim/faults
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import msgspec
import trio

from .http import parse_listen, serve_asgi

MAX_COMMANDS = 50

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class CommandError(Exception):
    """One command is invalid; Infinario answers an error for it alone."""


@dataclass
class Customer:
    number: int
    registered: str | None = None
    cookies: list[str] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)
    # v2: property key -> update_timestamp of the update that last set it
    stamps: dict[str, float] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {
            "customer": self.number,
            "ids": {"registered": self.registered, "cookies": list(self.cookies)},
            "properties": dict(self.properties),
        }


@dataclass
class Project:
    customers: dict[int, Customer] = field(default_factory=dict)
    registered: dict[str, int] = field(default_factory=dict)
    cookies: dict[str, int] = field(default_factory=dict)


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
    """An in-memory Infinario. Use as an ASGI app; inspect with the methods below."""

    def __init__(
        self,
        *,
        record: bool = True,
        v2_auth: dict[str, str] | None = None,
        rate_limit_per_minute: int | None = None,
        max_commands: int = MAX_COMMANDS,
    ) -> None:
        self.record = record
        self.v2_auth = v2_auth
        self.rate_limit = rate_limit_per_minute
        self.max_commands = max_commands
        self.faults = Faults()
        self._recent: deque[float] = deque()
        self.reset()

    # --- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.projects: dict[str, Project] = {}
        self.counts: Counter[str] = Counter()
        self.events_by_type: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self._next_customer = 1

    def stats(self) -> dict[str, Any]:
        return {
            **{k: self.counts[k] for k in ("requests", "commands", "events", "customer_updates",
                                           "errors", "retries")},
            "by_status": {str(k): v for k, v in sorted(self.statuses.items())},
            "events_by_type": dict(self.events_by_type),
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
        number = None
        if registered is not None:
            number = found.registered.get(registered)
        if number is None and cookie is not None:
            number = found.cookies.get(cookie)
        return found.customers.get(number) if number is not None else None

    def find_customer(self, project: str, registered: str | None = None,
                      cookie: str | None = None) -> dict[str, Any] | None:
        customer = self._resolve(project, registered, cookie)
        return customer.view() if customer else None

    def events_of(self, project: str, registered: str | None = None,
                  cookie: str | None = None) -> list[dict[str, Any]]:
        customer = self._resolve(project, registered, cookie)
        if customer is None:
            return []
        return [e for e in self.events
                if e["project"] == project and e["customer"] == customer.number]

    # --- faults ------------------------------------------------------------------------------

    def fail_requests(self, status: int, count: int | None = None,
                      retry_after: float | None = None) -> None:
        self.faults.request_status = status
        self.faults.request_count = count
        self.faults.retry_after = retry_after

    def fail_commands(self, status: str, count: int) -> None:
        if status not in ("retry", "error"):
            raise ValueError("status must be 'retry' or 'error'")
        self.faults.command_status = status
        self.faults.command_count = count

    def truncate_results(self, count: int) -> None:
        self.faults.truncate = count

    def set_delay(self, seconds: float) -> None:
        self.faults.delay = seconds

    def clear_faults(self) -> None:
        self.faults = Faults()

    def _apply_faults(self, spec: dict[str, Any]) -> None:
        if "fail_requests" in spec:
            f = spec["fail_requests"]
            self.fail_requests(int(f["status"]), f.get("count"), f.get("retry_after"))
        if "fail_commands" in spec:
            f = spec["fail_commands"]
            self.fail_commands(str(f["status"]), int(f["count"]))
        if "truncate_results" in spec:
            self.truncate_results(int(spec["truncate_results"]))
        if "delay" in spec:
            self.set_delay(float(spec["delay"]))

    # --- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status, answer, extra = await self._route(method, path, scope, headers, body)
        raw = answer if isinstance(answer, bytes) else _encode(answer)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
            *extra]})
        await send({"type": "http.response.body", "body": raw})

    async def _route(
        self, method: str, path: str, scope: Scope, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        if method == "POST" and path == "/bulk":
            return await self._tracking("legacy", None, headers, body)
        if method == "POST" and path.startswith("/track/v2/projects/") and path.endswith("/batch"):
            token = path[len("/track/v2/projects/"):-len("/batch")]
            if token and "/" not in token:
                return await self._tracking("v2", token, headers, body)
        if path == "/_sim/events" and method == "GET":
            return 200, self.events, []
        if path == "/_sim/customers" and method == "GET":
            query = parse_qs(scope.get("query_string", b"").decode())
            projects = query.get("project") or list(self.projects)
            return 200, [dict(c, project=p) for p in projects for c in self.customers(p)], []
        if path == "/_sim/stats" and method == "GET":
            return 200, self.stats(), []
        if path == "/_sim/reset" and method == "POST":
            self.reset()
            self.clear_faults()
            return 200, {"success": True}, []
        if path == "/_sim/faults":
            if method == "DELETE":
                self.clear_faults()
                return 200, {"success": True}, []
            if method == "POST":
                try:
                    spec = _decode(body)
                    assert isinstance(spec, dict)
                    self._apply_faults(spec)
                except Exception as exc:
                    return 400, {"success": False, "errors": [f"bad fault spec: {exc}"]}, []
                return 200, {"success": True}, []
        if path == "/" and method == "GET":
            return 200, {"simulator": "Infinario tracking API, legacy /bulk and v2 batch",
                         "inspect": ["/_sim/events", "/_sim/customers", "/_sim/stats"],
                         "control": ["/_sim/faults", "/_sim/reset"]}, []
        return 404, {"success": False, "errors": [f"no endpoint {method} {path}"]}, []

    async def _tracking(
        self, dialect: str, token: str | None, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        faults = self.faults
        if faults.delay:
            await trio.sleep(faults.delay)
        self.counts["requests"] += 1

        def answer(status: int, payload: Any,
                   extra: list[tuple[bytes, bytes]] | None = None
                   ) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
            self.statuses[status] += 1
            if self.record:
                self.requests.append({"dialect": dialect, "status": status,
                                      "commands": commands_count})
            return status, payload, extra or []

        commands_count = 0
        if self.rate_limit is not None:
            now = time.monotonic()
            while self._recent and self._recent[0] < now - 60:
                self._recent.popleft()
            if len(self._recent) >= self.rate_limit:
                return answer(429, {"success": False, "errors": ["rate limit exceeded"]},
                              [(b"retry-after", b"1")])
            self._recent.append(now)
        if faults.request_status is not None:
            status = faults.request_status
            if faults.request_count is not None:
                faults.request_count -= 1
                if faults.request_count <= 0:
                    faults.request_status = None
            extra = []
            if faults.retry_after is not None:
                extra.append((b"retry-after", str(faults.retry_after).encode()))
            return answer(status, {"success": False, "errors": ["simulated failure"]}, extra)
        if dialect == "v2":
            auth = headers.get("authorization", "")
            expected = (self.v2_auth or {}).get(token or "") if self.v2_auth else None
            if (self.v2_auth is not None and auth != expected) or (
                    self.v2_auth is None and not auth.startswith(("Token ", "Basic "))):
                return answer(400, {"success": False, "errors": ["Could not authenticate"]})
        try:
            data = _decode(body)
            commands = data["commands"]
            if not isinstance(commands, list):
                raise TypeError("commands must be a list")
        except Exception as exc:
            return answer(400, {"success": False, "errors": [f"malformed body: {exc}"]})
        commands_count = len(commands)
        if len(commands) > self.max_commands:
            return answer(400, {"success": False, "errors": [
                f"{len(commands)} commands; at most {self.max_commands} per request"]})
        keep = len(commands) - min(faults.truncate, len(commands))
        faults.truncate = 0
        results: list[dict[str, Any]] = []
        for command in commands[:keep]:
            self.counts["commands"] += 1
            if faults.command_count > 0:
                faults.command_count -= 1
                failed = faults.command_status
                if faults.command_count == 0:
                    faults.command_status = None
                if failed == "retry" and dialect == "legacy":
                    self.counts["retries"] += 1
                    results.append({"status": "retry"})
                else:
                    self.counts["errors"] += 1
                    results.append(self._error(dialect, "simulated error"))
                continue
            try:
                if dialect == "legacy":
                    self._legacy(command)
                    results.append({"status": "ok"})
                else:
                    assert token is not None
                    self._v2(token, command)
                    results.append({"success": True})
            except CommandError as exc:
                self.counts["errors"] += 1
                results.append(self._error(dialect, str(exc)))
        return answer(200, {"success": True, "results": results})

    @staticmethod
    def _error(dialect: str, message: str) -> dict[str, Any]:
        if dialect == "legacy":
            return {"status": "error", "errors": [message]}
        return {"success": False, "errors": [message]}

    # --- commands ----------------------------------------------------------------------------

    def _legacy(self, command: Any) -> None:
        name, data = _parts(command)
        project = _string(data, "project_id")
        if name == "crm/events":
            ids = _ids(data, "customer_ids")
            self._event(project, ids, _string(data, "type"), _props(data),
                        _number(data, "timestamp"))
        elif name == "crm/customers":
            if "customer_ids" in data and "ids" not in data:
                raise CommandError("crm/customers takes ids, not customer_ids")
            self._update(project, _ids(data, "ids"), _props(data), None)
        else:
            raise CommandError(f"unknown command {name!r}")

    def _v2(self, token: str, command: Any) -> None:
        name, data = _parts(command)
        if name == "customers/events":
            self._event(token, _ids(data, "customer_ids"), _string(data, "event_type"),
                        _props(data), _number(data, "timestamp"))
        elif name == "customers":
            if "update_timestamp" not in data:
                raise CommandError("customers needs update_timestamp")
            self._update(token, _ids(data, "customer_ids"), _props(data),
                         _number(data, "update_timestamp"))
        else:
            raise CommandError(f"unknown command {name!r}")

    def _event(self, project: str, ids: dict[str, str], type_: str,
               props: dict[str, Any], timestamp: float) -> None:
        self.counts["events"] += 1
        self.events_by_type[type_] += 1
        if not self.record:
            return
        customer = self._identify(project, ids)
        self.events.append({"project": project, "customer_ids": ids, "type": type_,
                            "properties": props, "timestamp": timestamp,
                            "customer": customer.number})

    def _update(self, project: str, ids: dict[str, str], props: dict[str, Any],
                stamp: float | None) -> None:
        self.counts["customer_updates"] += 1
        if not self.record:
            return
        customer = self._identify(project, ids)
        for key, value in props.items():
            if stamp is not None:
                # v2 runs a batch's commands in any order: an older update never wins.
                if customer.stamps.get(key, float("-inf")) > stamp:
                    continue
                customer.stamps[key] = stamp
            customer.properties[key] = value

    def _identify(self, project_token: str, ids: dict[str, str]) -> Customer:
        """Find or create the customer for these ids, merging the way Infinario does."""
        project = self.projects.setdefault(project_token, Project())
        registered = ids.get("registered")
        cookie = ids.get("cookie")
        by_r = project.customers.get(project.registered.get(registered, -1)) if registered \
            else None
        by_c = project.customers.get(project.cookies.get(cookie, -1)) if cookie else None
        if by_r is None and by_c is None:
            customer = Customer(self._next_customer)
            self._next_customer += 1
            project.customers[customer.number] = customer
            if registered:
                customer.registered = registered
                project.registered[registered] = customer.number
            if cookie:
                customer.cookies.append(cookie)
                project.cookies[cookie] = customer.number
            return customer
        if by_c is None:
            assert by_r is not None
            if cookie:
                by_r.cookies.append(cookie)
                project.cookies[cookie] = by_r.number
            return by_r
        if by_r is None:
            if registered:
                if by_c.registered is None:
                    by_c.registered = registered
                    project.registered[registered] = by_c.number
                    return by_c
                # A shared device: the cookie moves to a new registered customer.
                assert cookie is not None
                customer = Customer(self._next_customer, registered=registered)
                self._next_customer += 1
                project.customers[customer.number] = customer
                project.registered[registered] = customer.number
                self._move_cookie(project, cookie, by_c, customer)
                return customer
            return by_c
        if by_r is by_c:
            return by_r
        assert cookie is not None
        if by_c.registered is None:
            for c in by_c.cookies:
                if c not in by_r.cookies:
                    by_r.cookies.append(c)
                project.cookies[c] = by_r.number
            for key, value in by_c.properties.items():
                by_r.properties.setdefault(key, value)
            for event in self.events:
                if event["customer"] == by_c.number and event["project"] == project_token:
                    event["customer"] = by_r.number
            del project.customers[by_c.number]
        else:
            self._move_cookie(project, cookie, by_c, by_r)
        return by_r

    @staticmethod
    def _move_cookie(project: Project, cookie: str, source: Customer, target: Customer) -> None:
        if cookie in source.cookies:
            source.cookies.remove(cookie)
        if cookie not in target.cookies:
            target.cookies.append(cookie)
        project.cookies[cookie] = target.number


def _parts(command: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(command, dict) or not isinstance(command.get("data"), dict):
        raise CommandError("a command needs a name and a data object")
    return str(command.get("name")), command["data"]


def _string(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"{key} must be a non-empty string")
    return value


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(f"{key} must be a number")
    return float(value)


def _ids(data: dict[str, Any], key: str) -> dict[str, str]:
    ids = data.get(key)
    if not isinstance(ids, dict) or not ids:
        raise CommandError(f"{key} must name a registered or cookie id")
    for kind, value in ids.items():
        if kind not in ("registered", "cookie"):
            raise CommandError(f"unknown id kind {kind!r}")
        if not isinstance(value, str) or not value:
            raise CommandError(f"id {kind} must be a non-empty string")
    return ids


def _props(data: dict[str, Any]) -> dict[str, Any]:
    props = data.get("properties")
    if not isinstance(props, dict):
        raise CommandError("properties must be an object")
    for key in props:
        if "." in key or "$" in key:
            raise CommandError(f"property key {key!r} contains '.' or '$'")
    return props


async def run_simulator(
    sim: Simulator, host: str, port: int,
    *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until cancelled; ``task_status`` gets its base URL."""
    await serve_asgi(sim, host, port, task_status=task_status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infinario-router simulator",
                                     description="Run the built-in Infinario simulator.")
    parser.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (127.0.0.1:8090)")
    parser.add_argument("--counting", action="store_true",
                        help="count only, keep no records (for benchmarks)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--rate-limit", type=int, help="requests per minute before 429")
    args = parser.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"simulator: listen: {exc}", file=sys.stderr)
        return 2
    sim = Simulator(record=not args.counting, rate_limit_per_minute=args.rate_limit)
    sim.set_delay(args.delay)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(run_simulator, sim, host, port)
                print(f"simulator listening on {url}", file=sys.stderr, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
