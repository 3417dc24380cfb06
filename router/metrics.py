"""Counters, gauges and histograms, rendered as Prometheus text at ``/metrics``.

Each router has a private ``CollectorRegistry``: several routers in one process
(tests, an embedding program) never clash, and the host's global registry is
left alone. Every counter and histogram is declared here with its help text and
label names, and every series an operator would alert on is created at 0 when
the router starts: an alert on ``rate(...)`` or ``increase(...)`` works from the
first scrape, not only after the first failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

PREFIX = "router"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# The intake's Segment endpoints, as the ``endpoint`` label names them.
ENDPOINTS = ("batch", "single", "webhook", "other")
STATUSES = ("200", "400", "401", "404", "405", "413", "429", "431", "500", "503")
INFINARIO_OUTCOMES = ("answered", "retry", "refused", "auth")
DEAD_LETTER_REASONS = ("refused", "error", "rejected", "expired", "unreadable")
REJECT_REASONS = (
    "invalid_json", "invalid_message", "invalid_type", "missing_id", "invalid_id",
    "missing_event", "invalid_field", "invalid_message_id", "invalid_timestamp",
    "message_too_large", "too_deep", "invalid_write_key", "missing_write_key",
)
REFUSE_REASONS = ("reserved_event_type", "event_type_limit", "alias_registered",
                  "unknown_write_key")
OVERLOAD_REASONS = ("shutting_down", "pipeline is full", "spool is over its disk cap",
                    "the router is not running")
MESSAGE_TYPES = ("identify", "track", "page", "screen", "group", "alias")

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0)
_LAG = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
        14400.0)
_MESSAGES = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


@dataclass(frozen=True, slots=True)
class Spec:
    """One declared series family: help text, label names and the label values
    created at 0 up front (one tuple of values per label, combined)."""

    help: str
    labels: tuple[str, ...] = ()
    present: tuple[tuple[str, ...], ...] = ()
    buckets: tuple[float, ...] = ()


COUNTERS: dict[str, Spec] = {
    "requests_total": Spec("HTTP requests to the Segment endpoints, by endpoint and status "
                           "(scrapes and health checks are not counted)",
                           ("endpoint", "status"), (ENDPOINTS, STATUSES)),
    "messages_accepted_total": Spec("Segment messages journaled and acknowledged"),
    "messages_duplicate_total": Spec("Segment messages skipped as already seen (messageId)"),
    "messages_rejected_total": Spec("Segment messages rejected at intake, by reason",
                                    ("reason",), (REJECT_REASONS,)),
    "messages_processed_total": Spec("Segment messages turned into Infinario commands, by type",
                                     ("type",), (MESSAGE_TYPES,)),
    "messages_refused_total": Spec("Messages refused by the project's rules, by reason",
                                   ("reason",), (REFUSE_REASONS,)),
    "keys_sanitized_total": Spec("Property keys renamed because they held '.' or '$'"),
    "keys_dropped_total": Spec("Property keys dropped over a project's key limit"),
    "commands_delivered_total": Spec("Infinario commands answered ok"),
    "commands_retried_total": Spec("Infinario commands sent again"),
    "dead_letters_total": Spec("Commands and messages dead-lettered, by reason",
                               ("reason",), (DEAD_LETTER_REASONS,)),
    "infinario_requests_total": Spec("Requests sent to Infinario, by outcome",
                                     ("outcome",), (INFINARIO_OUTCOMES,)),
    "overloaded_total": Spec("Intake requests answered 503 because the relay could not take "
                             "them, by reason", ("reason",), (OVERLOAD_REASONS,)),
    "sessions_ended_total": Spec("session_end events emitted by the timer"),
    "customers_created_total": Spec("Customers created"),
    "customers_merged_total": Spec("Customers merged into another"),
    "cookies_moved_total": Spec("Cookies moved to another registered customer"),
    "cookies_dropped_total": Spec("Cookies dropped from a customer"),
    "customers_activated_total": Spec("Hibernated customers loaded from the store"),
    "customers_hibernated_total": Spec("Idle customers dropped from memory"),
    "webhook_signature_failures_total": Spec("Webhook requests refused for a missing or wrong "
                                             "X-Signature"),
}

HISTOGRAMS: dict[str, Spec] = {
    "intake_ack_seconds": Spec("Seconds from a Segment request's headers to its answer",
                               ("endpoint",), (ENDPOINTS[:3],), _SECONDS),
    "infinario_request_seconds": Spec("Seconds an Infinario request took, by outcome",
                                      ("outcome",), (INFINARIO_OUTCOMES,), _SECONDS),
    "delivery_lag_seconds": Spec("Seconds from an outbox row's commit to Infinario's final "
                                 "answer for its last command", buckets=_LAG),
    "batch_messages": Spec("Messages per accepted Segment request", ("endpoint",),
                           (ENDPOINTS[:3],), _MESSAGES),
}


def _combinations(present: Sequence[Sequence[str]]) -> Iterator[tuple[str, ...]]:
    if not present:
        return
    combos: list[tuple[str, ...]] = [()]
    for values in present:
        combos = [(*combo, value) for combo in combos for value in values]
    yield from combos


class Metrics:
    """The router's metrics on a private registry.

    ``inc``, ``get``, ``observe`` and ``gauge`` are the whole interface the rest
    of the router uses; names are given without the ``router_`` prefix.
    """

    def __init__(self, version: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        # (name, sorted labels) -> the labelled child, so the hot path skips
        # prometheus_client's label validation after the first call.
        self._children: dict[Any, Any] = {}
        self._callbacks = _Callbacks()
        for name, spec in COUNTERS.items():
            self._declare_counter(name, spec)
        for name, spec in HISTOGRAMS.items():
            histogram = Histogram(name, spec.help, spec.labels, namespace=PREFIX,
                                  registry=self.registry, buckets=spec.buckets)
            self._histograms[name] = histogram
            for values in _combinations(spec.present):
                histogram.labels(*values)
        self.registry.register(self._callbacks)
        self._callbacks.add("build_info", "The relay's version, as a label; always 1",
                            lambda: 1, kind="gauge", labels={"version": version or _version()})
        ProcessCollector(namespace=PREFIX, registry=self.registry)
        self._exposed = _WithoutCreated(self.registry)

    def _declare_counter(self, name: str, spec: Spec) -> Counter:
        counter = Counter(name, spec.help, spec.labels, namespace=PREFIX,
                          registry=self.registry)
        self._counters[name] = counter
        for values in _combinations(spec.present):
            counter.labels(*values)
        return counter

    def _child(self, kind: dict[str, Any], name: str, labels: Mapping[str, str]) -> Any:
        key = (name, *sorted(labels.items())) if labels else name
        child = self._children.get(key)
        if child is None:
            family = kind.get(name)
            if family is None:
                # Undeclared: still counted rather than lost, with its labels as given.
                # tests/test_metrics.py keeps every name the code uses declared.
                family = self._declare_counter(name, Spec(name, tuple(sorted(labels))))
            child = family.labels(**labels) if labels else family
            self._children[key] = child
        return child

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        self._child(self._counters, name, labels).inc(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(self._histograms, name, labels).observe(value)

    def get(self, name: str, **labels: str) -> float:
        """A counter's value for these labels, summed over the labels not given."""
        counter = self._counters.get(name)
        if counter is None:
            return 0
        total = 0.0
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and all(
                        sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped."""
        self._callbacks.add(name, help_text, read, kind="gauge")

    def counter_reader(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (a running total), read when scraped."""
        self._callbacks.add(name, help_text, read, kind="counter")

    def render(self) -> str:
        return generate_latest(self._exposed).decode()


class _Callbacks(Collector):
    """Gauges and counters whose values are read from the router when scraped."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, Callable[[], float], str, dict[str, str]]] = {}

    def add(self, name: str, help_text: str, read: Callable[[], float], *, kind: str,
            labels: dict[str, str] | None = None) -> None:
        self.entries[name] = (help_text, read, kind, labels or {})

    def collect(self) -> Iterable[Metric]:
        for name, (help_text, read, kind, labels) in sorted(self.entries.items()):
            full = f"{PREFIX}_{name}"
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(full, help_text, labels=list(labels))
            else:
                family = GaugeMetricFamily(full, help_text, labels=list(labels))
            family.add_metric(list(labels.values()), float(read()))
            yield family


class _WithoutCreated(Collector):
    """The registry as scraped, without the ``*_created`` series.

    prometheus_client adds a creation timestamp beside every counter and
    histogram series; in the text format each becomes a gauge of its own,
    doubling the series count for nothing an alert uses.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            if family.type in ("counter", "histogram"):
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def _version() -> str:
    from .cli import version

    return version()
