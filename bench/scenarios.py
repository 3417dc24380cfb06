"""The benchmark scenarios: what load each one drives and what it measures.

Each scenario gets a fresh simulator, relay and data directory (a ``Stack``),
drives it with ``bench.load`` processes and returns a ``Result``: the numbers,
the targets they are checked against, and the series the plot draws.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .measure import (
    Requests,
    Sample,
    cumulative,
    delivery_lags,
    median,
    percentile,
    proc_status_kb,
    rate_series,
    window_rates,
)
from .stack import BenchError, ClusterStack, Stack


@dataclass(frozen=True)
class Plan:
    """Durations and sizes for one mode (``--quick`` or ``--full``)."""

    mode: str
    batch_closed_seconds: float   # batch max-rate (closed loop) phase
    single_closed_seconds: float  # single max-rate (closed loop) phase
    open_seconds: float        # 50%-of-max (open loop) phase
    drain_timeout: float       # longest wait for the relay to deliver its backlog
    many_customers: int
    many_calls: int            # calls per customer in many-customers
    many_seconds: float        # cap on many-customers' sending time
    many_active: int | None    # --active-customers for many-customers (None: the default)
    outage_rate: float         # messages/s sent through the outage
    outage_warm: float         # steady load with Infinario up before the outage
    outage_seconds: float
    outage_after: float        # load continues this long after recovery
    outage_drain_timeout: float
    slow_seconds: float        # closed-loop load against the slow sink
    slow_spool_cap: str        # the relay's --spool-cap there
    floor_messages: int        # messages timed for the codec floor
    forwarder_seconds: float   # load time of each forwarder measurement (batch, single)
    cpu_window: float          # width of the windows of the batch max-rate CPU trend
    cluster_seconds: float     # each closed-loop phase of the Redis mode (1 relay, 2 relays)

    def closed_seconds(self, kind: str) -> float:
        return self.batch_closed_seconds if kind == "batch" else self.single_closed_seconds


# The full batch max-rate phase lasts a minute so that a per-message cost growing with
# time (a journal, an index, a heap) shows in its CPU trend and in the plot.
QUICK = Plan(mode="quick", batch_closed_seconds=1.5, single_closed_seconds=1.5,
             open_seconds=1.5, drain_timeout=20,
             many_customers=20_000, many_calls=2, many_seconds=4, many_active=5_000,
             outage_rate=1000, outage_warm=0.5, outage_seconds=6, outage_after=0.5,
             outage_drain_timeout=20, slow_seconds=2, slow_spool_cap="8MiB",
             floor_messages=3000, forwarder_seconds=1.5, cpu_window=0.5,
             cluster_seconds=3)
FULL = Plan(mode="full", batch_closed_seconds=60, single_closed_seconds=12, open_seconds=8,
            drain_timeout=90,
            many_customers=1_000_000, many_calls=2, many_seconds=180, many_active=None,
            outage_rate=1500, outage_warm=5, outage_seconds=60, outage_after=5,
            outage_drain_timeout=150, slow_seconds=25, slow_spool_cap="32MiB",
            floor_messages=20_000, forwarder_seconds=10.0, cpu_window=10.0,
            cluster_seconds=30)
CUSTOMERS = 10_000  # distinct customers of every scenario but many-customers
# Load generator connections of the closed (max-rate) and open (50%) phases.
CONNECTIONS = {"batch": (8, 32), "single": (32, 64)}


@dataclass
class Check:
    """One target: ``value`` (None when it could not be measured) against ``limit``."""

    name: str
    value: float | None
    limit: float
    unit: str
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "unit": self.unit,
                "op": ">=" if self.higher_is_better else "<=", "pass": self.passed}


@dataclass
class Result:
    name: str
    description: str
    relay_options: list[str] = field(default_factory=list)
    sim_options: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    loads: list[dict[str, Any]] = field(default_factory=list)
    relay_metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    relay_log_tail: list[str] = field(default_factory=list)


@dataclass
class Context:
    plan: Plan
    floor_us: dict[str, float]  # codec floor per body kind
    forwarder_us: dict[str, float] = field(default_factory=dict)  # forwarder CPU per kind


def ratio(value: float | None, base: float | None) -> float | None:
    """``value`` as a multiple of ``base``; None when either is missing."""
    return round(value / base, 1) if value and base else None


# --- shared arithmetic ---------------------------------------------------------------------

def _all_acks(stack: Stack) -> list[tuple[float, int]]:
    acks: list[tuple[float, int]] = []
    for r in stack.loads:
        acks.extend(r.ack_times())
    acks.sort()
    return acks


def _delivered_at(stack: Stack, t: float) -> tuple[int, int]:
    """(messages, commands) the simulator had at the sample nearest before ``t``."""
    best = (0, 0)
    for s in stack.timeline.samples:
        if s.t > t:
            break
        if s.delivered is not None and s.commands is not None:
            best = (s.delivered, s.commands)
    return best


def _max_rate(r: Requests) -> float:
    """Median of the per-second acked rates in a closed-loop run."""
    return median(window_rates(r.ack_times(), r.start, r.end)) or 0.0


def _delivery_window(stack: Stack, start: float, done: Sample | None) -> dict[str, Any]:
    """Delivery rate from ``start`` until the backlog was gone (or until now)."""
    end_sample = done or stack.latest
    if end_sample is None or end_sample.delivered is None:
        return {"delivered_per_s": None, "commands_per_s": None}
    d0, c0 = _delivered_at(stack, start)
    span = max(end_sample.t - start, 1e-9)
    return {
        "delivered_per_s": round((end_sample.delivered - d0) / span, 1),
        "commands_per_s": round(((end_sample.commands or 0) - c0) / span, 1),
    }


def _cpu_per_message(stack: Stack, start: float, done: Sample | None,
                     messages: int, which: str = "cpu_s") -> float | None:
    """Relay CPU (or ``redis_cpu_s``) from ``start`` until its backlog was delivered, per
    message acked."""
    end_sample = done or stack.latest
    cpu0 = stack.timeline.cpu_at(start, which)
    cpu1 = None if end_sample is None else getattr(end_sample, which)
    if cpu1 is None or cpu0 is None or messages <= 0:
        return None
    return round((cpu1 - cpu0) / messages * 1e6, 2)


def _cpu_trend(stack: Stack, run: Requests, window: float) -> list[dict[str, Any]]:
    """Relay CPU per message acked in consecutive ``window``-second slices of ``run``.

    CPU and acks are both counted by slice, so delivery running behind intake
    blurs a slice's figure a little; a steady rise across slices is what a
    per-message cost growing with time looks like.
    """
    acks = run.ack_times()
    out: list[dict[str, Any]] = []
    start = run.start
    while start + window / 2 <= run.end:
        end = min(start + window, run.end)
        acked = sum(n for t, n in acks if start <= t < end)
        cpu0, cpu1 = stack.timeline.cpu_at(start), stack.timeline.cpu_at(end)
        us = (round((cpu1 - cpu0) / acked * 1e6, 1)
              if acked and cpu0 is not None and cpu1 is not None else None)
        out.append({"from_s": round(start - run.start, 1), "to_s": round(end - run.start, 1),
                    "acked_per_s": round(acked / (end - start), 1), "cpu_us_per_msg": us})
        start = end
    return out


def _lags(stack: Stack, first: int = 0, last: int | None = None) -> dict[str, Any]:
    acked = cumulative(_all_acks(stack))
    delivered = stack.timeline.delivered_points()
    lags = delivery_lags(acked, delivered, first=first, last=last)
    p50, p99 = percentile(lags, 50), percentile(lags, 99)
    return {"lag_p50_s": None if p50 is None else round(p50, 3),
            "lag_p99_s": None if p99 is None else round(p99, 3)}


def _status_counts(stack: Stack) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in stack.loads:
        for s in r.status:
            counts[str(s)] = counts.get(str(s), 0) + 1
    return counts


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def finish(stack: Stack, result: Result, ctx: Context, kind: str) -> None:
    """What every scenario reports: totals, loss, status counts, the plot's series."""
    acked = stack.acked()
    last = stack.timeline.samples[-1] if stack.timeline.samples else None
    delivered = last.delivered if last and last.delivered is not None else 0
    statuses = _status_counts(stack)
    m = result.metrics
    m.update({
        "acked_messages": acked,
        "delivered_messages": delivered,
        "lost_messages": max(0, acked - delivered),
        "extra_deliveries": max(0, delivered - acked),
        "sent_messages": sum(r.info["sent_messages"] for r in stack.loads),
        "rejected_messages": sum(r.info["rejected_messages"] for r in stack.loads),
        "status_counts": statuses,
        "http_503": statuses.get("503", 0),
        "http_429": statuses.get("429", 0),
        "load_errors": sum(sum(r.info["errors"].values()) for r in stack.loads),
        "codec_floor_us": ctx.floor_us.get(kind),
    })
    hwm = proc_status_kb(stack.relay.pid, "VmHWM")
    m["peak_rss_mb"] = None if hwm is None else round(hwm / 1024, 1)
    cpu = m.get("relay_cpu_us_per_msg")
    m["cpu_floor_ratio"] = ratio(cpu, ctx.floor_us.get(kind))
    m["forwarder_us"] = ctx.forwarder_us.get(kind)
    m["cpu_forwarder_ratio"] = ratio(cpu, ctx.forwarder_us.get(kind))
    result.loads = [{k: v for k, v in r.info.items() if k not in ("requests", "buckets")}
                    for r in stack.loads]
    # A quick phase lasts a second or two: finer windows, or it is one or two points.
    result.series = series(stack, step=0.25 if ctx.plan.mode == "quick" else 1.0)


def series(stack: Stack, step: float = 1.0) -> dict[str, Any]:
    """Curves for the plot, in seconds from the first load."""
    samples = stack.timeline.samples
    if not stack.loads or not samples:
        return {}
    t0 = min(r.start for r in stack.loads)
    t1 = samples[-1].t
    a_ts, a_tot = cumulative(_all_acks(stack))
    d_ts, d_tot = stack.timeline.delivered_points()
    ax, ay = rate_series(a_ts, a_tot, t0, t1, step)
    dx, dy = rate_series(d_ts, d_tot, t0, t1, step)
    lat_x: list[float] = []
    lat_p50: list[float | None] = []
    lat_p99: list[float | None] = []
    overload_x: list[float] = []
    overload_y: list[int] = []
    buckets: dict[int, list[float]] = {}
    refusals: dict[int, int] = {}
    for r in stack.loads:
        for t, lat, s in zip(r.t, r.latency, r.status, strict=True):
            i = int((t - t0) / step)
            if s == 200:
                buckets.setdefault(i, []).append(lat)
            elif s in (429, 503):
                refusals[i] = refusals.get(i, 0) + 1
    for i in sorted(buckets):
        lat_x.append(round((i + 0.5) * step, 3))
        lat_p50.append(_ms(percentile(buckets[i], 50)))
        lat_p99.append(_ms(percentile(buckets[i], 99)))
    for i in sorted(refusals):
        overload_x.append(round((i + 0.5) * step, 3))
        overload_y.append(refusals[i])
    return {
        "t0": t0,
        "acked_rate": {"t": ax, "per_s": ay},
        "delivered_rate": {"t": dx, "per_s": dy},
        "latency_ms": {"t": lat_x, "p50": lat_p50, "p99": lat_p99},
        "step_s": step,
        "refused_per_s": {"t": overload_x, "count": [n / step for n in overload_y]},
        "rss_mb": {"t": [round(s.t - t0, 2) for s in samples if s.rss_mb is not None],
                   "mb": [round(s.rss_mb, 1) for s in samples if s.rss_mb is not None]},
        "redis_rss_mb": {"t": [round(s.t - t0, 2) for s in samples
                               if s.redis_rss_mb is not None],
                         "mb": [round(s.redis_rss_mb, 1) for s in samples
                                if s.redis_rss_mb is not None]},
        "relays": len(getattr(stack, "relays", [None])),
        "phases": [(round(a - t0, 2), round(b - t0, 2), label)
                   for a, b, label in stack.timeline.phases],
        "marks": [(round(t - t0, 2), label) for t, label in stack.timeline.marks],
    }


def _rss_mean(stack: Stack, seconds: float = 1.0) -> float | None:
    now = time.monotonic()
    values = stack.timeline.rss_between(now - seconds, now)
    return sum(values) / len(values) if values else None


async def _warm_up(stack: Stack, ctx: Context, result: Result) -> float | None:
    """Send every customer one message at full speed and let it all be delivered.

    The relay then holds its customers and has run its intake at full tilt, so
    RSS measured after this is its steady state and growth past it is the
    backlog's doing. Returns that RSS (MB).
    """
    await stack.load("warm-up", kind="batch", mode="closed", duration=30, connections=8,
                     max_messages=CUSTOMERS)
    await _drain(stack, ctx.plan.drain_timeout, result, "warm-up")
    await trio.sleep(0.3)
    return _rss_mean(stack, 0.3)


async def _drain(stack: Stack, seconds: float, result: Result, phase: str) -> Sample | None:
    """Wait up to ``seconds`` for every acked message to be delivered; record a timeout."""
    target = stack.acked()
    done = await stack.wait_delivered(target, seconds)
    if done is None:
        got = stack.latest.delivered if stack.latest else None
        result.metrics.setdefault("drain_timeouts", []).append(
            {"phase": phase, "acked": target, "delivered": got, "timeout_s": seconds})
    return done


# --- the scenarios -------------------------------------------------------------------------

async def throughput(stack: Stack, ctx: Context, result: Result, kind: str) -> None:
    """Max rate in a closed loop, then ack latency in an open loop at half of it."""
    plan = ctx.plan
    closed_conns, open_conns = CONNECTIONS[kind]
    closed = await stack.load("max-rate", kind=kind, mode="closed",
                              duration=plan.closed_seconds(kind), connections=closed_conns)
    done = await _drain(stack, plan.drain_timeout, result, "max-rate")
    max_rate = _max_rate(closed)
    m = result.metrics
    m["acked_per_s"] = round(max_rate, 1)
    m["requests_per_s"] = round(max_rate / (100 if kind == "batch" else 1), 1)
    m.update(_delivery_window(stack, closed.start, done))
    m["relay_cpu_us_per_msg"] = _cpu_per_message(stack, closed.start, done, closed.acked())
    m["backlog_drained_s"] = None if done is None else round(done.t - closed.end, 2)
    m["cpu_trend"] = _cpu_trend(stack, closed, plan.cpu_window)
    if max_rate <= 0:
        raise BenchError("the relay acknowledged nothing in the max-rate phase")
    first = stack.acked()
    rate = max_rate / 2
    opened = await stack.load("50% open loop", kind=kind, mode="open", rate=rate,
                              duration=plan.open_seconds, connections=open_conns)
    await _drain(stack, plan.drain_timeout, result, "open loop")
    lat = opened.latencies()
    m["open_rate_per_s"] = round(rate, 1)
    m["open_acked_per_s"] = round(opened.acked() / max(opened.end - opened.start, 1e-9), 1)
    m["ack_p50_ms"] = _ms(percentile(lat, 50))
    m["ack_p99_ms"] = _ms(percentile(lat, 99))
    m["late_tickets"] = opened.info["late_tickets"]
    m.update(_lags(stack, first=first, last=stack.acked()))
    m["lag_scope"] = "open-loop phase"


async def batch(stack: Stack, ctx: Context, result: Result) -> None:
    await throughput(stack, ctx, result, "batch")
    finish(stack, result, ctx, "batch")
    m = result.metrics
    result.checks = [
        Check("acked msg/s", m.get("acked_per_s"), 25_000, "msg/s", True),
        Check("delivered msg/s", m.get("delivered_per_s"), 25_000, "msg/s", True),
        Check("relay CPU per msg", m.get("relay_cpu_us_per_msg"), 35, "µs", False),
        Check("relay CPU ÷ forwarder", m.get("cpu_forwarder_ratio"), 8, "×",  # noqa: RUF001
              False),
        Check("ack p99 at 50% of max", m.get("ack_p99_ms"), 25, "ms", False),
        Check("lost messages", m.get("lost_messages"), 0, "msgs", False),
    ]


async def single(stack: Stack, ctx: Context, result: Result) -> None:
    await throughput(stack, ctx, result, "single")
    finish(stack, result, ctx, "single")
    m = result.metrics
    result.checks = [
        Check("acked req/s", m.get("requests_per_s"), 3_000, "req/s", True),
        Check("ack p99 at 50% of max", m.get("ack_p99_ms"), 25, "ms", False),
        Check("lost messages", m.get("lost_messages"), 0, "msgs", False),
    ]


async def many_customers(stack: Stack, ctx: Context, result: Result) -> None:
    """Every customer a few calls, far more customers than the relay keeps in memory."""
    plan = ctx.plan
    n = plan.many_customers
    run = await stack.load("max-rate", kind="batch", mode="closed", duration=plan.many_seconds,
                           connections=8, customers=n, max_messages=n * plan.many_calls)
    done = await _drain(stack, plan.drain_timeout * 2, result, "many customers")
    m = result.metrics
    m["customers"] = n
    m["customers_reached"] = min(n, run.info["sent_messages"])
    m["calls_per_customer"] = round(run.info["sent_messages"] / n, 2)
    m["acked_per_s"] = round(_max_rate(run), 1)
    m.update(_delivery_window(stack, run.start, done))
    m["relay_cpu_us_per_msg"] = _cpu_per_message(stack, run.start, done, run.acked())
    m.update(_lags(stack))
    m["lag_scope"] = "whole run (closed loop)"
    result.relay_metrics = await stack.relay_metrics()
    finish(stack, result, ctx, "batch")
    result.checks = [
        Check("peak RSS", m.get("peak_rss_mb"), 500, "MB", False),
        Check("lost messages", m.get("lost_messages"), 0, "msgs", False),
    ]


async def outage(stack: Stack, ctx: Context, result: Result) -> None:
    """Infinario answers 503 for a while under steady load; the backlog must wait on disk."""
    plan = ctx.plan
    total = plan.outage_warm + plan.outage_seconds + plan.outage_after
    m = result.metrics
    marks: dict[str, float] = {}
    m["rss_after_warm_up_mb"] = await _warm_up(stack, ctx, result)

    async def faults() -> None:
        await trio.sleep(plan.outage_warm)
        m["rss_before_mb"] = _rss_mean(stack)
        await stack.fail_requests(503)
        marks["down"] = time.monotonic()
        stack.timeline.mark(marks["down"], "Infinario down (503)")
        await trio.sleep(plan.outage_seconds)
        await stack.clear_faults()
        marks["up"] = time.monotonic()
        stack.timeline.mark(marks["up"], "Infinario back")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(faults)
        run = await stack.load("steady rate", kind="batch", mode="open",
                               rate=plan.outage_rate, duration=total, connections=16)
    done = await _drain(stack, plan.outage_drain_timeout, result, "after outage")
    end = done.t if done else time.monotonic()
    during = stack.timeline.rss_between(marks["down"], end)
    before = m.get("rss_before_mb")
    m["rss_max_during_mb"] = round(max(during), 1) if during else None
    m["rss_growth_mb"] = (round(max(during) - before, 1) if during and before is not None
                          else None)
    m["outage_s"] = plan.outage_seconds
    m["acked_per_s"] = round(run.acked() / max(run.end - run.start, 1e-9), 1)
    m["recovered_in_s"] = None if done is None else round(done.t - marks["up"], 2)
    m.update(_delivery_window(stack, marks["up"], done))
    m["relay_cpu_us_per_msg"] = _cpu_per_message(stack, run.start, done, run.acked())
    lat = run.latencies()
    m["ack_p50_ms"] = _ms(percentile(lat, 50))
    m["ack_p99_ms"] = _ms(percentile(lat, 99))
    m.update(_lags(stack))
    m["lag_scope"] = "whole run, outage included"
    result.relay_metrics = await stack.relay_metrics()
    finish(stack, result, ctx, "batch")
    result.checks = [
        Check("RSS growth in outage", m.get("rss_growth_mb"), 50, "MB", False),
        Check("lost messages", m.get("lost_messages"), 0, "msgs", False),
    ]


async def slow_sink(stack: Stack, ctx: Context, result: Result) -> None:
    """Infinario slower than intake: the spool fills to its cap and intake must push back."""
    plan = ctx.plan
    m = result.metrics
    m["rss_before_mb"] = await _warm_up(stack, ctx, result)
    run = await stack.load("max-rate", kind="batch", mode="closed",
                           duration=plan.slow_seconds, connections=8)
    done = await _drain(stack, plan.drain_timeout * 2, result, "after load")
    end = done.t if done else time.monotonic()
    during = stack.timeline.rss_between(run.start, end)
    before = m["rss_before_mb"]
    m["rss_max_during_mb"] = round(max(during), 1) if during else None
    m["rss_growth_mb"] = (round(max(during) - before, 1) if during and before is not None
                          else None)
    m["acked_per_s"] = round(run.acked() / max(run.end - run.start, 1e-9), 1)
    m.update(_delivery_window(stack, run.start, done))
    m["relay_cpu_us_per_msg"] = _cpu_per_message(stack, run.start, done, run.acked())
    m["backlog_drained_s"] = None if done is None else round(done.t - run.end, 2)
    m["first_503_after_s"] = next(
        (round(t - run.start, 2) for t, s in zip(run.t, run.status, strict=True) if s == 503),
        None)
    m.update(_lags(stack))
    m["lag_scope"] = "whole run"
    result.relay_metrics = await stack.relay_metrics()
    finish(stack, result, ctx, "batch")
    result.checks = [
        Check("503s sent (backpressure)", float(m["http_503"] + m["http_429"]), 1, "reqs", True),
        Check("RSS growth with full spool", m.get("rss_growth_mb"), 50, "MB", False),
        Check("lost messages", m.get("lost_messages"), 0, "msgs", False),
    ]


# --- the Redis mode ----------------------------------------------------------------------

REDIS_BUDGET = 0.8  # of one core: what one Redis shard may spend before it is called full
CLUSTER_RELAYS = (1, 2)  # relay processes of each phase
CLUSTER_PARTITIONS = 16


def capacity(relay_us: float | None, redis_us: float | None) -> dict[str, float | None]:
    """What the CPU per message implies for one Redis shard.

    Redis at ``REDIS_BUDGET`` of a core carries ``budget / redis_us`` messages a
    second; one relay process with a core of its own carries ``1 / relay_us``; their
    quotient is how many relay processes one shard keeps busy.
    """
    if not relay_us or not redis_us:
        return {"shard_msgs_per_s": None, "relay_msgs_per_s_per_core": None,
                "relays_per_shard": None}
    shard = REDIS_BUDGET * 1e6 / redis_us
    relay = 1e6 / relay_us
    return {"shard_msgs_per_s": round(shard), "relay_msgs_per_s_per_core": round(relay),
            "relays_per_shard": round(shard / relay, 1)}


async def _cluster_phase(stack: ClusterStack, ctx: Context, result: Result,
                         relays: int) -> dict[str, Any]:
    """One closed-loop phase over the first ``relays`` relays, drained; its numbers."""
    plan = ctx.plan
    label = _relays(relays)
    held = await stack.wait_shared(30)
    first = stack.acked()
    usec0 = await stack.redis_command_usec()
    run = await stack.load(label, kind="batch", mode="closed",
                           duration=plan.cluster_seconds, connections=CONNECTIONS["batch"][0],
                           urls=stack.active_urls)
    done = await _drain(stack, plan.drain_timeout, result, label)
    acked = run.acked()
    relay_us = _cpu_per_message(stack, run.start, done, acked)
    redis_us = _cpu_per_message(stack, run.start, done, acked, "redis_cpu_s")
    usec1 = await stack.redis_command_usec()
    inside = {name: round((usec1[name] - usec0.get(name, 0)) / max(acked, 1), 2)
              for name in usec1 if usec1[name] > usec0.get(name, 0)}
    end = done or stack.latest
    phase: dict[str, Any] = {
        "relays": relays,
        "partitions_held": held,
        "acked_by_relay": run.info.get("acked_by_target"),
        "acked_messages": acked,
        "acked_per_s": round(_max_rate(run), 1),
        "relay_cpu_us_per_msg": relay_us,
        "redis_cpu_us_per_msg": redis_us,
        "relay_cores_used": _cores(stack, run.start, end, "cpu_s"),
        "redis_cores_used": _cores(stack, run.start, end, "redis_cpu_s"),
        "redis_used_memory_mb": await stack.redis_memory_mb(),
        # Redis µs per message by command, largest first. A command a script calls counts
        # under its own name and under evalsha too, so only evalsha (every script, all
        # it calls) and the rest of Redis's CPU (other commands, sockets, the protocol,
        # the AOF write and its fsync) add up.
        "redis_command_us_per_msg": dict(sorted(inside.items(), key=lambda kv: -kv[1])),
        "redis_scripts_us_per_msg": inside.get("evalsha"),
        "redis_outside_scripts_us_per_msg": (
            None if redis_us is None else round(redis_us - inside.get("evalsha", 0.0), 2)),
        "backlog_drained_s": None if done is None else round(done.t - run.end, 2),
        "http_503": run.count(503),
        "lost_messages": (None if end is None or end.delivered is None
                          else max(0, stack.acked() - end.delivered)),
        "extra_deliveries": (None if end is None or end.delivered is None
                             else max(0, end.delivered - stack.acked())),
        **_delivery_window(stack, run.start, done),
        **_lags(stack, first=first, last=stack.acked()),
        **capacity(relay_us, redis_us),
    }
    phase["cpu_floor_ratio"] = ratio(relay_us, ctx.floor_us.get("batch"))
    phase["cpu_forwarder_ratio"] = ratio(relay_us, ctx.forwarder_us.get("batch"))
    return phase


def _relays(n: int) -> str:
    return f"{n} relay" + ("s" if n != 1 else "")


def _cores(stack: Stack, start: float, end: Sample | None, which: str) -> float | None:
    """CPU seconds used per second between ``start`` and ``end``: cores kept busy."""
    cpu0 = stack.timeline.cpu_at(start, which)
    cpu1 = None if end is None else getattr(end, which)
    if cpu0 is None or cpu1 is None or end is None or end.t <= start:
        return None
    return round((cpu1 - cpu0) / (end.t - start), 2)


async def _until(read: Callable[[], Awaitable[int]], ok: Callable[[int], bool],
                 seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        value = await read()
        if ok(value):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"still {value} after {seconds:.0f}s")
        await trio.sleep(0.1)


async def cluster(stack: Stack, ctx: Context, result: Result) -> None:
    """The Redis mode: one relay, then two sharing one Redis; CPU per message of each side."""
    assert isinstance(stack, ClusterStack)
    m = result.metrics
    m["partitions"] = stack.partitions
    m["redis_budget_of_a_core"] = REDIS_BUDGET
    # Every customer once, so both phases find them in Redis.
    await stack.load("warm-up", kind="batch", mode="closed", duration=30, connections=8,
                     max_messages=CUSTOMERS)
    await _drain(stack, ctx.plan.drain_timeout, result, "warm-up")
    phases = []
    for relays in CLUSTER_RELAYS:
        while stack.active < relays:
            # A partition's new owner holds its sender back for --request-timeout when
            # the outbox it takes over has rows (the last owner may have had them in
            # flight): let the last phase's rows be finished first.
            await _until(stack.outbox_length, lambda n: n == 0, 10)
            await stack.add_relay()
            stack.timeline.mark(time.monotonic(), f"relay {stack.active} started")
        phases.append(await _cluster_phase(stack, ctx, result, relays))
    m["phases"] = phases
    last = phases[-1]
    for key in ("acked_per_s", "delivered_per_s", "commands_per_s", "relay_cpu_us_per_msg",
                "lag_p99_s"):
        m[key] = last.get(key)
    if len(phases) > 1 and phases[0]["acked_per_s"]:
        m["speedup_2_relays"] = round(last["acked_per_s"] / phases[0]["acked_per_s"], 2)
    m["redis_peak_rss_mb"] = max((round(x.redis_rss_mb, 1) for x in stack.timeline.samples
                                  if x.redis_rss_mb is not None), default=None)
    result.relay_metrics = await stack.relay_metrics()
    finish(stack, result, ctx, "batch")
    peaks = [proc_status_kb(relay.pid, "VmHWM") for relay in stack.relays[:stack.active]]
    known = [kb for kb in peaks if kb is not None]
    if known:
        m["peak_rss_mb"] = round(max(known) / 1024, 1)  # the largest relay's
    result.checks = [
        *(Check(f"lost messages, {_relays(p['relays'])}", p["lost_messages"], 0, "msgs", False)
          for p in phases),
        Check("lost messages", m.get("lost_messages"), 0, "msgs", False),
    ]


StackFactory = Callable[..., Stack]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: Callable[[Stack, Context, Result], Awaitable[None]]
    relay_options: Callable[[Plan], list[str]] = lambda plan: []
    sim_options: Callable[[Plan], list[str]] = lambda plan: []
    stack: StackFactory = Stack

    def make_stack(self, workdir: Path, plan: Plan) -> Stack:
        return self.stack(workdir, relay_options=self.relay_options(plan),
                          sim_options=self.sim_options(plan))


SCENARIOS = [
    Scenario("batch", "100-message /v1/batch bodies, the Segment mix, 10,000 customers: "
             "max rate (closed loop), then ack latency at 50% of it (open loop)", batch),
    Scenario("single", "one message per request on /v1/<type> (Segment's webhook "
             "destination): max rate, then ack latency at 50% of it", single),
    Scenario("many-customers", "batches for far more customers than the relay keeps in "
             "memory, a few calls each: hibernation and peak RSS", many_customers,
             relay_options=lambda plan: ([] if plan.many_active is None
                                         else ["--active-customers", str(plan.many_active)])),
    Scenario("outage", "steady load while Infinario answers 503, then recovers: RSS growth "
             "and full delivery", outage),
    Scenario("slow-sink", "Infinario answering after 50 ms, closed-loop load and a small spool "
             "cap: backpressure (503) and RSS growth, then full delivery", slow_sink,
             relay_options=lambda plan: ["--spool-cap", plan.slow_spool_cap,
                                         "--concurrency", "4"],
             sim_options=lambda plan: ["--delay", "0.05"]),
    Scenario("cluster", "the Redis mode (--redis, --role all): one redis-server with "
             "deploy/redis.conf (appendfsync always), batches in a closed loop to one relay "
             "process, then spread over two; relay and Redis CPU per message and the "
             "capacity of one Redis shard they imply", cluster,
             stack=lambda workdir, **options: ClusterStack(
                 workdir, relays=max(CLUSTER_RELAYS), partitions=CLUSTER_PARTITIONS,
                 **options)),
]
BY_NAME = {s.name: s for s in SCENARIOS}
