"""Metrics an operator can alert on: declared up front, present at 0, scraped over HTTP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.cli import version
from router.metrics import (
    COUNTERS,
    DEAD_LETTER_REASONS,
    ENDPOINTS,
    HISTOGRAMS,
    INFINARIO_OUTCOMES,
    STATUSES,
    Metrics,
)

from .conftest import WRITE_KEY, Relay
from .test_intake import basic, track

ROUTER = Path(__file__).resolve().parent.parent / "router"


def scrape(text: str) -> dict[str, Any]:
    """name -> (type, {frozenset(labels.items()) of each sample named ``name``: value})."""
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            entry = families.setdefault(sample.name, (family.type, {}))
            entry[1][frozenset(sample.labels.items())] = sample.value
    return families


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    result: float = families[name][1][frozenset(labels.items())]
    return result


async def metrics_text(relay: Relay) -> str:
    response = await relay.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


class TestFromStartup:
    """A fresh relay's /metrics already holds every series an alert would use, at 0."""

    async def test_alertable_series_exist_at_zero(self, relay: Relay) -> None:
        families = scrape(await metrics_text(relay))
        for endpoint in ENDPOINTS:
            for status in STATUSES:
                assert value(families, "router_requests_total", endpoint=endpoint,
                             status=status) == 0
        for outcome in INFINARIO_OUTCOMES:
            assert value(families, "router_infinario_requests_total", outcome=outcome) == 0
        for reason in DEAD_LETTER_REASONS:
            assert value(families, "router_dead_letters_total", reason=reason) == 0
        for reason in ("invalid_json", "missing_id", "missing_event", "message_too_large"):
            assert value(families, "router_messages_rejected_total", reason=reason) == 0
        for reason in ("shutting_down", "pipeline is full", "spool is over its disk cap"):
            assert value(families, "router_overloaded_total", reason=reason) == 0
        assert value(families, "router_messages_accepted_total") == 0
        assert value(families, "router_delivery_lag_seconds_count") == 0
        assert value(families, "router_intake_ack_seconds_count", endpoint="batch") == 0

    async def test_every_declared_family_is_typed(self, relay: Relay) -> None:
        text = await metrics_text(relay)
        for name in COUNTERS:
            assert f"# TYPE router_{name} counter" in text
            assert f"# HELP router_{name} " in text
        for name in HISTOGRAMS:
            assert f"# TYPE router_{name} histogram" in text
        assert "# TYPE router_store_commits_total counter" in text
        assert "journal_commits" not in text
        assert not re.search(r"_created[ {]", text)
        # Every counter sample's family is a counter, every _bucket's a histogram.
        for name, (kind, _) in scrape(text).items():
            if name.endswith("_total"):
                assert kind == "counter", name
            if name.endswith("_bucket"):
                assert kind == "histogram", name

    async def test_build_info_and_process(self, relay: Relay) -> None:
        families = scrape(await metrics_text(relay))
        assert value(families, "router_build_info", version=version()) == 1
        assert value(families, "router_process_cpu_seconds_total") > 0
        assert value(families, "router_process_resident_memory_bytes") > 1024 * 1024
        assert value(families, "router_process_open_fds") > 0
        assert value(families, "router_store_commits_total") > 0


class TestRequestsTotal:
    """requests_total counts Segment requests by endpoint and status, never scrapes or probes."""

    async def test_scrapes_and_probes_are_not_counted(self, relay: Relay) -> None:
        for _ in range(3):
            await relay.client.get("/metrics")
            await relay.client.get("/health")
            await relay.client.get("/ready")
            await relay.client.get("/report")
        assert relay.router.metrics.get("requests_total") == 0

    async def test_endpoints_and_statuses(self, relay: Relay) -> None:
        client = relay.client
        auth = basic(WRITE_KEY)
        assert (await client.post("/v1/batch", json={"batch": [track(1)]},
                                  headers=auth)).status_code == 200
        assert (await client.post("/v1/track", json=track(2), headers=auth)).status_code == 200
        assert (await client.post("/v1/track", json=track(3),
                                  headers=basic("nope"))).status_code == 401
        assert (await client.post("/v1/webhook", json=track(4),
                                  headers=auth)).status_code == 200
        assert (await client.get("/v1/batch")).status_code == 405
        assert (await client.get("/nowhere")).status_code == 404
        families = scrape(await metrics_text(relay))
        expected = {("batch", "200"): 1, ("single", "200"): 1, ("single", "401"): 1,
                    ("webhook", "200"): 1, ("batch", "405"): 1, ("other", "404"): 1}
        for (endpoint, status), count in expected.items():
            assert value(families, "router_requests_total", endpoint=endpoint,
                         status=status) == count
        assert relay.router.metrics.get("requests_total") == sum(expected.values())


class TestHistograms:
    """Ack latency, batch sizes, Infinario request time and delivery lag are observed."""

    async def test_observed_over_a_delivery(self, relay: Relay) -> None:
        batch = {"batch": [track(n) for n in range(5)]}
        response = await relay.client.post("/v1/batch", json=batch, headers=basic(WRITE_KEY))
        assert response.status_code == 200
        assert len(await relay.events("Clicked")) == 5
        families = scrape(await metrics_text(relay))
        assert value(families, "router_intake_ack_seconds_count", endpoint="batch") == 1
        ack = value(families, "router_intake_ack_seconds_sum", endpoint="batch")
        assert 0 < ack < 10
        assert value(families, "router_batch_messages_count", endpoint="batch") == 1
        assert value(families, "router_batch_messages_sum", endpoint="batch") == 5
        assert value(families, "router_infinario_request_seconds_count", outcome="answered") >= 1
        assert value(families, "router_infinario_requests_total", outcome="answered") >= 1
        # One outbox row per round and lane: at least one row became final.
        lag_count = value(families, "router_delivery_lag_seconds_count")
        assert lag_count >= 1
        assert 0 <= value(families, "router_delivery_lag_seconds_sum") < 10 * lag_count
        assert value(families, "router_delivery_lag_seconds_bucket", le="+Inf") == lag_count


class TestPropertyKeys:
    """Sanitized and dropped keys are counted per message turned, summed per round;
    a refused message changed nothing and counts nothing."""

    @pytest.fixture
    def relay_options(self) -> dict[str, Any]:
        return {"max_event_keys": 2, "max_event_types": 1}

    async def test_sanitized_and_dropped_keys(self, relay: Relay) -> None:
        batch = {"batch": [
            track(1, properties={"a.b": 1, "c$": 2}),  # 2 sanitized, both kept
            track(2, properties={"x.y": 1, "z": 2}),  # 1 sanitized; x_y and z are dropped
            # A second event type is refused: its sanitized key must not count.
            {**track(3, properties={"q.r": 1}), "event": "Other"},
        ]}
        response = await relay.client.post("/v1/batch", json=batch, headers=basic(WRITE_KEY))
        assert response.json()["accepted"] == 3
        assert len(await relay.events("Clicked")) == 2
        families = scrape(await metrics_text(relay))
        assert value(families, "router_keys_sanitized_total") == 3
        assert value(families, "router_keys_dropped_total") == 2
        assert value(families, "router_messages_refused_total", reason="event_type_limit") == 1


class TestRegistry:
    """Each router has a registry of its own, and the Metrics interface is unchanged."""

    def test_two_registries_do_not_share_counts(self) -> None:
        first, second = Metrics(), Metrics()
        first.inc("messages_accepted_total", 3)
        first.inc("dead_letters_total", reason="expired")
        first.inc("dead_letters_total", 2, reason="error")
        assert first.get("messages_accepted_total") == 3
        assert second.get("messages_accepted_total") == 0
        assert first.get("dead_letters_total") == 3
        assert first.get("dead_letters_total", reason="error") == 2
        assert first.get("no_such_total") == 0

    def test_gauges_and_histograms(self) -> None:
        metrics = Metrics(version="9.9")
        reading = [4.0]
        metrics.gauge("spool_bytes", "Bytes not finished", lambda: reading[0])
        metrics.observe("batch_messages", 7, endpoint="webhook")
        families = scrape(metrics.render())
        assert families["router_spool_bytes"][0] == "gauge"
        assert value(families, "router_spool_bytes") == 4
        assert value(families, "router_build_info", version="9.9") == 1
        assert value(families, "router_batch_messages_sum", endpoint="webhook") == 7
        reading[0] = 5.0
        assert value(scrape(metrics.render()), "router_spool_bytes") == 5

    def test_every_name_the_code_uses_is_declared(self) -> None:
        """A counter or histogram named in the code, with the labels it is given, is
        declared in metrics.py: an undeclared one would miss its help and its zeros."""
        call = re.compile(r"\.(inc|observe)\(\s*\"(\w+)\"(.*?)\)\s*$", re.S | re.M)
        seen = 0
        for path in ROUTER.glob("*.py"):
            for kind, name, rest in call.findall(path.read_text()):
                declared = COUNTERS if kind == "inc" else HISTOGRAMS
                assert name in declared, f"{path.name}: {name} is not declared"
                labels = set(re.findall(r"(\w+)=", rest))
                assert labels == set(declared[name].labels), (path.name, name, labels)
                seen += 1
        assert seen > 20

