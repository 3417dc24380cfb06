"""The summary table: the numbers of every scenario run, and the targets checked."""

from __future__ import annotations

from typing import Any

from .framework import ceilings


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
           "lag p99 s", "relay CPU µs/msg", "floor µs/msg", "CPU ÷ floor", "peak RSS MB",
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
        _fmt(m.get("peak_rss_mb")),
        _fmt(m.get("rss_growth_mb"), 1),
        _pair(m.get("http_503"), m.get("http_429"), 0),
        _fmt(m.get("acked_messages")),
        _pair(m.get("lost_messages"), m.get("extra_deliveries"), 0),
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(row) for row in rows)]


def _commands_per_message(results: list[dict[str, Any]], kind: str) -> float:
    for r in results:
        m = r.get("metrics", {})
        if r["scenario"] == kind and m.get("commands_per_s") and m.get("delivered_per_s"):
            return float(m["commands_per_s"]) / float(m["delivered_per_s"])
    return 1.0


def framework_lines(results: list[dict[str, Any]], header: dict[str, Any]) -> list[str]:
    """What hypercorn and httpx cost with no relay work, and the ceilings that sets."""
    framework = header.get("framework")
    if not framework:
        return []
    if "error" in framework:
        return [f"Framework floor: not measured ({framework['error'].splitlines()[0]}).", ""]
    server, client = framework["server"], framework["client"]
    lines = [
        "Framework floor (a null ASGI app on hypercorn's trio worker; httpx bulk posts): "
        + "; ".join(f"{kind} request {_fmt(v['us_per_request'])} µs CPU "
                    f"({_fmt(v['us_per_message'], 1)} µs/msg, at most "
                    f"{_fmt(v['max_requests_per_s_one_core'])} req/s on one core)"
                    for kind, v in server.items())
        + f"; a bulk POST of {client['commands_per_request']} commands "
        f"{_fmt(client['us_per_request'])} µs ({_fmt(client['us_per_command'], 1)} µs/command).",
    ]
    parts = []
    for kind in server:
        c = ceilings(framework, header.get("floor_us", {}), _commands_per_message(results, kind))
        parts.append(f"{kind} {_fmt(c[f'{kind}_least_us_per_msg'], 1)} µs/msg "
                     f"(at most {_fmt(c[f'{kind}_max_msg_per_s_one_core'])} msg/s on one core)")
    lines += [
        "Least CPU per message with this stack (server + client + codec floors, no relay "
        "work): " + "; ".join(parts) + ".",
        "",
    ]
    return lines


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
        *framework_lines(results, header),
        *_table(NUMBERS, [number_row(r) for r in results]),
        "",
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
