"""Named points where the relay can be told to die as ``kill -9`` would, for crash tests.

``ROUTER_CRASH_AT=NAME:N`` in the environment makes the process SIGKILL itself the
Nth time it passes the point ``NAME`` (every point sits inside a store
transaction, where a real crash would hurt most). Unset, a point costs one
global lookup per store operation.
"""

from __future__ import annotations

import os
import signal

_name, _, _count = os.environ.get("ROUTER_CRASH_AT", "").partition(":")
_remaining = int(_count) if _name and _count.isdigit() else 0

POINTS = ("journal-append", "round-commit", "outbox-progress")


def crash_point(name: str) -> None:
    """Die here if this is the armed point's Nth pass."""
    global _remaining
    if _remaining and name == _name:
        _remaining -= 1
        if not _remaining:
            os.kill(os.getpid(), signal.SIGKILL)
