"""The summary table: the numbers of every scenario run, and the targets checked."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _pair(a: Any, b: Any, digits: int = 1) -> str:
    if a is None and b is None:
        return "-"
    return f"{_fmt(a, digits)} / {_fmt(b, digits)}"


NUMBERS = ["scenario", "acked msg/s", "delivered msg/s", "cmd/s delivered", "ack p50 / p99 ms",
           "lag p99 s", "relay CPU µs/msg", "floor µs/msg", "CPU ÷ floor", "forwarder µs/msg",
           "CPU ÷ forwarder", "peak RSS MB",
           "RSS growth MB", "503 / 429", "acked", "lost / extra"]


def number_row(r: dict[str, Any]) -> list[str]:
    m = r.get("metrics", {})
    return [
        r["scenario"] + (" (ERROR)" if r.get("error") else ""),
        _fmt(m.get("acked_per_s")),
        _fmt(m.get("delivered_per_s")),
        _fmt(m.get("commands_per_s")),
        _pair(m.get("ack_p50_ms"), m.get("ack_p99_ms")),
        _fmt(m.get("lag_p99_s"), 2),
        _fmt(m.get("relay_cpu_us_per_msg"), 1),
        _fmt(m.get("codec_floor_us"), 2),
        _fmt(m.get("cpu_floor_ratio"), 1),
        _fmt(m.get("forwarder_us"), 2),
        _fmt(m.get("cpu_forwarder_ratio"), 1),
        _fmt(m.get("peak_rss_mb")),
        _fmt(m.get("rss_growth_mb"), 1),
        _pair(m.get("http_503"), m.get("http_429"), 0),
        _fmt(m.get("acked_messages")),
        _pair(m.get("lost_messages"), m.get("extra_deliveries"), 0),
    ]


def number_rows(r: dict[str, Any]) -> list[list[str]]:
    """The scenario's rows of the main table: one per phase for the Redis mode's."""
    phases = r.get("metrics", {}).get("phases")
    if not phases:
        return [number_row(r)]
    rows = []
    for phase in phases:
        m = {**r["metrics"], **phase, "ack_p50_ms": None, "ack_p99_ms": None,
             "http_429": None, "rss_growth_mb": None}
        name = f"{r['scenario']}, {phase['relays']} relay" + ("s" if phase["relays"] > 1 else "")
        rows.append(number_row({**r, "scenario": name, "metrics": m}))
    return rows


CAPACITY = ["Redis mode", "acked msg/s", "delivered msg/s", "relay CPU µs/msg",
            "Redis CPU µs/msg", "cores used: relays / Redis", "shard msg/s at 80%",
            "relay msg/s per core", "relays per shard"]


def capacity_lines(results: list[dict[str, Any]], header: dict[str, Any]) -> list[str]:
    """The Redis mode's CPU per message on each side and the capacity model it implies."""
    out: list[str] = []
    for r in results:
        m = r.get("metrics", {})
        phases = m.get("phases")
        if not phases:
            continue
        budget = m.get("redis_budget_of_a_core", 0.8)
        rows = [[f"{p['relays']} relay" + ("s" if p["relays"] > 1 else ""),
                 _fmt(p.get("acked_per_s")), _fmt(p.get("delivered_per_s")),
                 _fmt(p.get("relay_cpu_us_per_msg"), 1), _fmt(p.get("redis_cpu_us_per_msg"), 1),
                 _pair(p.get("relay_cores_used"), p.get("redis_cores_used"), 2),
                 _fmt(p.get("shard_msgs_per_s")), _fmt(p.get("relay_msgs_per_s_per_core")),
                 _fmt(p.get("relays_per_shard"), 1)] for p in phases]
        cores = header.get("machine", {}).get("cores")
        out += [
            f"Redis mode ({r['scenario']}; one redis-server with deploy/redis.conf, "
            f"appendfsync always; {m.get('partitions')} partitions; relays --role all):",
            "",
            *_table(CAPACITY, rows),
            "",
            "Relay CPU is every relay process's, summed; Redis CPU is redis-server's (user + "
            "system, from /proc), both from the start of the phase until its backlog was "
            f"delivered, per message acked. A shard at {budget:.0%} of a core carries "
            f"{budget:g} s ÷ Redis µs/msg; one relay process with a core to itself carries "
            "1 s ÷ relay µs/msg; their quotient is how many relay processes one Redis shard "
            f"keeps busy. On this {cores}-core machine the relays, Redis, the simulator and "
            "the load generator share the cores, so the msg/s columns are what this machine "
            "managed, not what the design scales to; CPU per message is the number that "
            "carries over to a bigger host.",
            "",
        ]
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(row) for row in rows)]


def forwarder_lines(header: dict[str, Any]) -> list[str]:
    """What the bare forwarder cost under the same load, measured in this run."""
    fwd = header.get("forwarder")
    if not fwd:
        return []
    if "error" in fwd:
        return [f"Forwarder: not measured ({fwd['error'].splitlines()[0]}).", ""]
    parts = []
    for kind in ("batch", "single"):
        if kind in fwd:
            v = fwd[kind]
            parts.append(f"{kind} {_fmt(v['us_per_message'], 2)} µs/msg "
                         f"({_fmt(v['us_per_request'])} µs/request; "
                         f"{_fmt(v['acked_per_s'])} msg/s acked on {v['connections']} "
                         "connections)")
    return ["Forwarder (bench/forwarder.py: asyncio + httptools + msgspec, bulks of 50, "
            "no journal, state or dedup), same load: " + "; ".join(parts) + ".", ""]


def cpu_trend_line(results: list[dict[str, Any]]) -> list[str]:
    """The batch max-rate phase's relay CPU per message, slice by slice."""
    for r in results:
        trend = r.get("metrics", {}).get("cpu_trend")
        if r["scenario"] == "batch" and trend:
            width = trend[0]["to_s"] - trend[0]["from_s"]
            return [f"Batch max-rate relay CPU µs/msg per {_fmt(width, 1)} s: "
                    + ", ".join(_fmt(w["cpu_us_per_msg"], 1) for w in trend) + ".", ""]
    return []


def summary(results: list[dict[str, Any]], header: dict[str, Any]) -> str:
    machine = header["machine"]
    lines = [
        f"# Benchmark summary ({header['mode']}, {header['timestamp']})",
        "",
        f"Machine: {machine['cores']} cores, Python {machine['python']}, "
        f"{machine['platform']}; load average at start {machine['load_average']}. "
        f"Codec floor (msgspec decode intake + encode legacy bulk): "
        + ", ".join(f"{k} {v:.2f} µs/msg" for k, v in header["floor_us"].items()) + ".",
        "",
        *forwarder_lines(header),
        *_table(NUMBERS, [row for r in results for row in number_rows(r)]),
        "",
        *cpu_trend_line(results),
        *capacity_lines(results, header),
        "Targets:",
        "",
    ]
    rows = []
    for r in results:
        for t in r.get("targets", []):
            value = t["value"]
            digits = 0 if value is None or float(value).is_integer() else 1
            rows.append([r["scenario"], t["name"], f"{_fmt(value, digits)} {t['unit']}",
                         f"{t['op']} {_fmt(t['limit'])} {t['unit']}",
                         "PASS" if t["pass"] else "FAIL"])
        if r.get("error"):
            rows.append([r["scenario"], "ran to completion", r["error"].splitlines()[0][:60],
                         "no error", "FAIL"])
        for timeout in r.get("metrics", {}).get("drain_timeouts", []):
            rows.append([r["scenario"], f"delivered after {timeout['phase']}",
                         f"{_fmt(timeout['delivered'])} of {_fmt(timeout['acked'])}",
                         f"all within {timeout['timeout_s']:.0f} s", "FAIL"])
    lines += _table(["scenario", "target", "measured", "limit", "result"], rows)
    passed = sum(1 for row in rows if row[-1] == "PASS")
    lines += ["", f"{passed} of {len(rows)} checks passed."]
    return "\n".join(lines) + "\n"
