"""The metrics exposition (sse_gateway.metrics), read back with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from sse_gateway.metrics import (
    CLOSE_REASONS,
    LATENCY_BUCKETS,
    MAX_EVENT_TYPES,
    EventLoopLag,
    Exposition,
    Metrics,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics, accept: str | None = None) -> tuple[Samples, str]:
    body, content_type = Exposition(metrics).render(accept)
    text = body.decode()
    families = (
        openmetrics_families(text)
        if content_type.startswith("application/openmetrics-text")
        else text_string_to_metric_families(text)
    )
    samples: Samples = {}
    for family in families:
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, content_type


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_counters_read_at_scrape_time() -> None:
    m = Metrics()
    m.stream_opened("b1")
    m.stream_opened("b1")
    m.stream_opened("b2")
    m.stream_closed("b1", "client")
    m.delivered += 7
    m.rejected["invalid_token"] += 2
    m.invalid_messages["not_json"] += 1
    samples, content_type = scrape(m)
    assert content_type.startswith("text/plain")
    assert value(samples, "sse_gateway_connections", brand="b1") == 1
    assert value(samples, "sse_gateway_connections", brand="b2") == 1
    assert value(samples, "sse_gateway_connections_opened_total") == 3
    assert value(samples, "sse_gateway_connections_closed_total", reason="client") == 1
    assert value(samples, "sse_gateway_events_delivered_total") == 7
    assert value(samples, "sse_gateway_connections_rejected_total", reason="invalid_token") == 2
    assert value(samples, "sse_gateway_events_dropped_total", reason="not_json") == 1


def test_every_close_reason_is_exposed_from_the_start_and_shutdown_is_drain() -> None:
    m = Metrics()
    samples, _ = scrape(m)
    for reason in CLOSE_REASONS:
        assert value(samples, "sse_gateway_connections_closed_total", reason=reason) == 0
    m.stream_closed("b", "shutdown")
    samples, _ = scrape(m)
    assert value(samples, "sse_gateway_connections_closed_total", reason="drain") == 1
    assert ("sse_gateway_connections_closed_total", frozenset({("reason", "shutdown")})) not in (
        samples
    )


def test_brands_past_the_cap_are_summed_under_other_and_labels_stay() -> None:
    m = Metrics(max_brands=2)
    for brand in ("a", "b", "c", "d"):
        m.stream_opened(brand)
    m.stream_opened("c")
    samples, _ = scrape(m)
    assert value(samples, "sse_gateway_connections", brand="a") == 1
    assert value(samples, "sse_gateway_connections", brand="other") == 3
    assert {labels for name, labels in samples if name == "sse_gateway_connections"} == {
        frozenset({("brand", b)}) for b in ("a", "b", "other")
    }
    # A labelled brand that goes offline keeps its series, at 0.
    m.stream_closed("a", "client")
    samples, _ = scrape(m)
    assert value(samples, "sse_gateway_connections", brand="a") == 0
    assert "a" not in m.open_by_brand  # nothing kept for brands offline


def test_connections_exist_at_zero_before_any_stream() -> None:
    samples, _ = scrape(Metrics())
    assert value(samples, "sse_gateway_connections", brand="other") == 0


def test_no_brand_label_at_all_with_a_cap_of_zero() -> None:
    m = Metrics(max_brands=0)
    m.stream_opened("a")
    samples, _ = scrape(m)
    assert value(samples, "sse_gateway_connections", brand="other") == 1


def test_latency_histogram_buckets_are_cumulative_with_le_bounds() -> None:
    m = Metrics()
    m.observe_latency("bet", 0.0005, 3)  # on a bound: that bound's bucket
    m.observe_latency("bet", 0.003, 1)
    m.observe_latency("bet", 60.0, 2)  # past the last bound: +Inf only
    samples, _ = scrape(m)
    bucket = "sse_gateway_delivery_latency_seconds_bucket"
    assert value(samples, bucket, event="bet", le="0.0005") == 3
    assert value(samples, bucket, event="bet", le="0.0025") == 3
    assert value(samples, bucket, event="bet", le="0.005") == 4
    assert value(samples, bucket, event="bet", le="10.0") == 4
    assert value(samples, bucket, event="bet", le="+Inf") == 6
    assert value(samples, "sse_gateway_delivery_latency_seconds_count", event="bet") == 6
    total = value(samples, "sse_gateway_delivery_latency_seconds_sum", event="bet")
    assert total == pytest.approx(3 * 0.0005 + 0.003 + 120.0)
    assert len(LATENCY_BUCKETS) == 14 and LATENCY_BUCKETS[0] == 0.0005 and LATENCY_BUCKETS[-1] == 10


def test_event_types_past_the_cap_share_other() -> None:
    m = Metrics()
    for i in range(MAX_EVENT_TYPES + 5):
        m.observe_latency(f"type{i}", 0.001, 1)
    samples, _ = scrape(m)
    counts = {
        dict(labels)["event"]: v
        for (name, labels), v in samples.items()
        if name == "sse_gateway_delivery_latency_seconds_count"
    }
    assert len(counts) == MAX_EVENT_TYPES + 1
    assert counts["other"] == 5


def test_openmetrics_when_the_scraper_asks() -> None:
    m = Metrics()
    m.stream_opened("b")
    samples, content_type = scrape(m, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert value(samples, "sse_gateway_connections_opened_total") == 1


def test_gauges_and_counters_kept_elsewhere_are_read_at_scrape() -> None:
    m = Metrics()
    box = {"lag": 0.25, "sent": 3}
    m.gauge("event_loop_lag_seconds", "lag", lambda: box["lag"])
    m.counter("heartbeats_sent_total", "hb", lambda: box["sent"])
    box["sent"] = 9
    samples, _ = scrape(m)
    assert value(samples, "sse_gateway_event_loop_lag_seconds") == 0.25
    assert value(samples, "sse_gateway_heartbeats_sent_total") == 9


def test_the_process_collector_is_there() -> None:
    samples, _ = scrape(Metrics())
    names = {name for name, _ in samples}
    assert {"process_resident_memory_bytes", "process_open_fds", "process_max_fds"} <= names


# Prometheus naming conventions (https://prometheus.io/docs/practices/naming/).
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_UNITS_NOT_BASE = ("_milliseconds", "_ms", "_kilobytes", "_kb", "_minutes", "_percent")


def test_every_name_follows_the_conventions() -> None:
    m = Metrics()
    m.gauge("connection_limit", "x", lambda: 1)
    m.counter("heartbeats_sent_total", "x", lambda: 1)
    m.observe_latency("t", 0.1, 1)
    body, _ = Exposition(m).render(None)
    for family in text_string_to_metric_families(body.decode()):
        if family.name.startswith("process_"):
            continue  # prometheus-client's own
        name = family.name
        assert name.startswith("sse_gateway_"), name
        assert _NAME.match(name), name
        assert not name.endswith(_UNITS_NOT_BASE), name
        if family.type == "counter":
            # The text parser strips `_total` from a counter family's name; its samples keep it.
            assert all(s.name == name + "_total" for s in family.samples), name
        else:
            assert not name.endswith("_total"), name
        assert family.documentation, f"{name} has no HELP"
        for sample in family.samples:
            assert "player" not in sample.labels, name


def test_event_loop_lag_measures_a_blocked_loop() -> None:
    async def body() -> float:
        lag = EventLoopLag(period=0.05)
        lag.start()
        try:
            time.sleep(0.2)  # blocks the loop past the timer's due time (0.05 s from start)
            for _ in range(3):
                await asyncio.sleep(0)  # the overdue timer runs on the next loop turn
            return lag.lag
        finally:
            lag.stop()

    # A lower bound by construction (the clock is monotonic): the tick came >= 0.15 s late.
    assert asyncio.run(body()) >= 0.15


def test_a_stamp_from_the_future_counts_as_zero() -> None:
    """Clocks a little apart (publisher ahead of the gateway): never a negative sum."""
    m = Metrics()
    m.observe_latency("t", -0.2, 2)
    samples, _ = scrape(m)
    bucket = "sse_gateway_delivery_latency_seconds_bucket"
    assert value(samples, bucket, event="t", le="0.0005") == 2
    assert value(samples, "sse_gateway_delivery_latency_seconds_sum", event="t") == 0.0
