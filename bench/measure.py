"""Process sampling and the arithmetic of the results: percentiles, rates, delivery lag.

Times are ``time.monotonic()`` seconds, which on Linux is one clock for every
process on the machine, so the load generator's records and the orchestrator's
samples line up without any offset.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]

BUCKET = 0.1  # seconds per point of the acked/delivered curves


# --- percentiles -------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


# --- the relay process -------------------------------------------------------------------

def proc_status_kb(pid: int, field_name: str) -> int | None:
    """A ``kB`` line of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``), None once gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(proc: psutil.Process, children: bool = False) -> float | None:
    """User + system CPU of a process, all its threads included (``/proc/PID/stat``);
    with ``children``, also that of the children it has waited for (redis-server's
    forks that rewrite its append-only file)."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return None
    total = times.user + times.system
    if children:
        total += times.children_user + times.children_system
    return float(total)


@dataclass
class Sample:
    t: float
    rss_mb: float | None
    cpu_s: float | None
    delivered: int | None  # messages delivered so far (commands minus session events)
    commands: int | None
    stats: dict[str, Any] | None = None
    redis_cpu_s: float | None = None  # the Redis mode's redis-server
    redis_rss_mb: float | None = None


@dataclass
class Timeline:
    """Samples of the relay and the simulator, every ``BUCKET`` seconds."""

    samples: list[Sample] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (time, label)
    phases: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, label)

    def mark(self, t: float, label: str) -> None:
        self.marks.append((t, label))

    def rss_between(self, start: float, end: float) -> list[float]:
        return [s.rss_mb for s in self.samples
                if start <= s.t <= end and s.rss_mb is not None]

    def cpu_at(self, t: float, which: str = "cpu_s") -> float | None:
        """CPU seconds at the sample nearest ``t``: the relay's, or ``redis_cpu_s``."""
        best = None
        for s in self.samples:
            if getattr(s, which) is None:
                continue
            if best is None or abs(s.t - t) < abs(best.t - t):
                best = s
        return None if best is None else getattr(best, which)  # type: ignore[no-any-return]

    def delivered_points(self) -> tuple[list[float], list[int]]:
        ts = [s.t for s in self.samples if s.delivered is not None]
        ds = [s.delivered for s in self.samples if s.delivered is not None]
        return ts, ds  # type: ignore[return-value]


# --- load generator records --------------------------------------------------------------

@dataclass
class Requests:
    """One load generator run: per request, when it was due, its latency, status, size."""

    t: list[float]
    latency: list[float]
    status: list[int]
    messages: list[int]
    start: float
    end: float
    info: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Requests:
        r = data["requests"]
        return cls(t=r["t"], latency=r["latency"], status=r["status"], messages=r["messages"],
                   start=data["start"], end=data["end"], info=data)

    def acked(self) -> int:
        return sum(n for n, s in zip(self.messages, self.status, strict=True) if s == 200)

    def ack_times(self) -> list[tuple[float, int]]:
        """(time of the 200, messages in it), in time order."""
        return sorted((t + lat, n) for t, lat, s, n in zip(
            self.t, self.latency, self.status, self.messages, strict=True) if s == 200)

    def latencies(self, start: float | None = None, end: float | None = None,
                  status: int = 200) -> list[float]:
        lo = self.start if start is None else start
        hi = self.end if end is None else end
        return [lat for t, lat, s in zip(self.t, self.latency, self.status, strict=True)
                if s == status and lo <= t <= hi]

    def count(self, status: int) -> int:
        return sum(1 for s in self.status if s == status)


# --- curves and lag ----------------------------------------------------------------------

def cumulative(events: Sequence[tuple[float, int]]) -> tuple[list[float], list[int]]:
    """Step curve of a running total from (time, increment) pairs sorted by time."""
    ts: list[float] = []
    total = 0
    cs: list[int] = []
    for t, n in events:
        total += n
        ts.append(t)
        cs.append(total)
    return ts, cs


def rate_series(ts: Sequence[float], totals: Sequence[int], t0: float, t1: float,
                step: float) -> tuple[list[float], list[float]]:
    """Per-second rate of a cumulative curve, in windows of ``step`` seconds from ``t0``."""
    xs: list[float] = []
    ys: list[float] = []
    t = t0
    while t < t1:
        a, b = value_at(ts, totals, t), value_at(ts, totals, t + step)
        xs.append(t + step / 2 - t0)
        ys.append((b - a) / step)
        t += step
    return xs, ys


def value_at(ts: Sequence[float], totals: Sequence[int], t: float) -> int:
    """The running total at time ``t`` (0 before the first point)."""
    i = bisect.bisect_right(ts, t)
    return totals[i - 1] if i else 0


def time_reaching(ts: Sequence[float], totals: Sequence[int], k: int) -> float | None:
    """When the running total first reached ``k``; None if it never did."""
    i = bisect.bisect_left(totals, k)
    return ts[i] if i < len(ts) else None


def delivery_lags(acked: tuple[list[float], list[int]],
                  delivered: tuple[list[float], list[int]], *,
                  first: int = 0, last: int | None = None, points: int = 2000) -> list[float]:
    """Estimated ack-to-delivery lags of ``points`` messages spread over ``(first, last]``.

    Message ``k`` is taken to be acked when the acked total reached ``k`` and
    delivered when the delivered total did (first in, first out). The delivered
    curve comes from polling the simulator every ``BUCKET`` seconds, so each lag
    is only good to about that much; it is an estimate, never a per-message trace.
    """
    a_ts, a_tot = acked
    d_ts, d_tot = delivered
    if not a_tot or not d_tot:
        return []
    top = min(a_tot[-1], d_tot[-1]) if last is None else min(last, a_tot[-1], d_tot[-1])
    span = top - first
    if span <= 0:
        return []
    lags: list[float] = []
    for i in range(1, points + 1):
        k = first + max(1, span * i // points)
        ta, td = time_reaching(a_ts, a_tot, k), time_reaching(d_ts, d_tot, k)
        if ta is not None and td is not None:
            lags.append(max(0.0, td - ta))
    return lags


def window_rates(acks: Sequence[tuple[float, int]], start: float, end: float,
                 step: float = 1.0) -> list[float]:
    """Acked messages per second in consecutive ``step`` windows of ``[start, end)``.

    The first and last window are left out when there are more than three: they
    hold the ramp-up and the tail.
    """
    count = max(1, int((end - start) // step))
    totals = [0] * count
    for t, n in acks:
        i = int((t - start) // step)
        if 0 <= i < count:
            totals[i] += n
    rates = [x / step for x in totals]
    return rates[1:-1] if len(rates) > 3 else rates


def machine() -> dict[str, Any]:
    import platform
    import sys

    return {
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
