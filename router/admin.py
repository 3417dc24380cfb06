"""The operator endpoints: ``/metrics``, ``/report``, ``/ready`` and ``/health``.

With ``--admin-listen`` they are served by a listener of their own (``Admin``),
which keeps scrapes and the project report (it names project tokens and
schemas) off the address Segment clients reach; the intake then keeps only
``/health``, for load balancers. Without it the intake serves ``/metrics``,
``/health`` and ``/ready`` itself, and ``/report`` is not served at all.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

import msgspec

from .metrics import CONTENT_TYPE, Metrics
from .server import RequestHead, Response, Route

OPERATOR_PATHS = frozenset({"/metrics", "/report", "/ready", "/health"})
# Served by the intake: with an admin listener, and without one.
INTAKE_WITH_ADMIN = frozenset({"/health"})
INTAKE_ALONE = frozenset({"/metrics", "/health", "/ready"})

_encode = msgspec.json.Encoder().encode


class Operated(Protocol):
    """What the operator endpoints read from the router."""

    metrics: Metrics

    def report(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...

    def readiness(self) -> str | None: ...


def _json(status: int, body: Any) -> Response:
    return Response(status, _encode(body))


def not_found(path: str) -> Response:
    return _json(404, {"code": "not_found", "message": f"no endpoint {path}"})


def operator_response(router: Operated, head: RequestHead, path: str,
                      served: Collection[str]) -> Response | None:
    """The answer for an operator endpoint in ``served``; None if ``path`` is none of them.

    An operator path that is not served here answers 404, as an unknown path does.
    """
    if path not in OPERATOR_PATHS:
        return None
    if path not in served:
        return not_found(path)
    method = head.method
    if method not in ("GET", "HEAD") or (path in ("/metrics", "/report") and method != "GET"):
        return _json(405, {"code": "method_not_allowed", "message": f"use GET for {path}"})
    if path == "/health":
        health = router.health()
        return _json(200 if health["status"] == "ok" else 503, health)
    if path == "/ready":
        reason = router.readiness()
        if reason is None:
            return _json(200, {"ready": True})
        return _json(503, {"ready": False, "reason": reason})
    if path == "/metrics":
        return Response(200, router.metrics.render().encode(), content_type=CONTENT_TYPE)
    return _json(200, router.report())


class Admin:
    """The admin listener's handler: the operator endpoints and nothing else."""

    def __init__(self, router: Operated) -> None:
        self.router = router

    def answered(self, status: int, head: RequestHead | None) -> None:
        """Scrapes and probes are not intake traffic: nothing is counted."""

    def route(self, head: RequestHead) -> Route | Response:
        path = head.path.rstrip("/") or "/"
        response = operator_response(self.router, head, path, OPERATOR_PATHS)
        return response if response is not None else not_found(path)
