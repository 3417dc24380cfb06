"""Counters and gauges, rendered as Prometheus text at ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]

_HELP = {
    "requests_total": "HTTP requests answered by the intake, by status",
    "messages_accepted_total": "Segment messages journaled and acknowledged",
    "messages_duplicate_total": "Segment messages skipped as already seen (messageId)",
    "messages_rejected_total": "Segment messages rejected at intake, by reason",
    "messages_processed_total": "Segment messages turned into Infinario commands, by type",
    "messages_refused_total": "Messages refused by the project's rules, by reason",
    "keys_sanitized_total": "Property keys renamed because they held '.' or '$'",
    "keys_dropped_total": "Property keys dropped over a project's key limit",
    "commands_delivered_total": "Infinario commands answered ok",
    "commands_retried_total": "Infinario commands sent again",
    "dead_letters_total": "Commands dead-lettered, by status",
    "infinario_requests_total": "Requests sent to Infinario, by outcome",
    "overloaded_total": "Requests answered 503 because the pipeline was full",
    "sessions_ended_total": "session_end events emitted by the timer",
    "customers_created_total": "Customers created",
    "customers_merged_total": "Customers merged into another",
    "cookies_moved_total": "Cookies moved to another registered customer",
    "customers_activated_total": "Hibernated customers loaded from the store",
    "customers_hibernated_total": "Idle customers dropped from memory",
}


class Metrics:
    """A small registry: counters keyed by name and labels, plus gauge callbacks."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[Labels, float]] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        series = self.counters.get(name)
        if series is None:
            series = self.counters[name] = {}
        key = tuple(sorted(labels.items())) if labels else ()
        series[key] = series.get(key, 0) + value

    def get(self, name: str, **labels: str) -> float:
        series = self.counters.get(name, {})
        if labels:
            return series.get(tuple(sorted(labels.items())), 0)
        return sum(series.values())

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self.counters):
            full = "router_" + name
            lines.append(f"# HELP {full} {_HELP.get(name, name)}")
            lines.append(f"# TYPE {full} counter")
            for labels, value in sorted(self.counters[name].items()):
                lines.append(f"{full}{_labels(labels)} {_number(value)}")
        for name in sorted(self.gauges):
            help_text, read = self.gauges[name]
            full = "router_" + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} gauge")
            lines.append(f"{full} {_number(read())}")
        return "\n".join(lines) + "\n"


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + inner + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
