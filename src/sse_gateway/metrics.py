"""Process metrics: plain counters on the hot paths, exposed through prometheus-client.

A delivered event costs an integer add here, not a `Counter.inc()` (a lock and a label lookup);
`GatewayCollector` reads these values when Prometheus scrapes, and prometheus-client writes the
exposition (text format or OpenMetrics, as the scraper's `Accept` asks). Names, units and labels:
docs/metrics.md.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

PREFIX = "sse_gateway_"
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of `sse_gateway_delivery_latency_seconds`, +Inf implied."""
MAX_EVENT_TYPES = 100
"""Event types with a latency series of their own; later ones are summed under `other`."""
OTHER = "other"
# The wire's close reason `shutdown` is the metric's `drain` (issue 12 names the label).
_CLOSE_LABELS = {"shutdown": "drain"}
# Always exposed, at 0 until they happen: an alert on a rate needs the series to exist.
CLOSE_REASONS = (
    "client",
    "slow_consumer",
    "session_expired",
    "kicked",
    "drain",
    "history_gap",
    "replay_failed",
    "error",
)


class LatencyHistogram:
    """Counts per bucket of LATENCY_BUCKETS (the last one is +Inf) and their sum, in seconds."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0


class Metrics:
    """The counters of one process; bumped in place by the parts that see each happening."""

    __slots__ = (
        "broker_reconnects",
        "closed",
        "counters",
        "delivered",
        "gauges",
        "invalid_messages",
        "labelled_brands",
        "labelled_gauges",
        "latency",
        "max_brands",
        "messages_received",
        "open_by_brand",
        "opened",
        "published",
        "refills",
        "rejected",
        "replayed_events",
        "replays",
    )

    def __init__(self, max_brands: int = 100) -> None:
        """`max_brands`: SSE_METRICS_MAX_BRANDS, brands with a `brand` label of their own."""
        self.opened = 0
        self.delivered = 0
        self.messages_received = 0
        self.published = 0
        self.replayed_events = 0
        self.replays: Counter[str] = Counter()
        self.refills: Counter[str] = Counter()
        self.broker_reconnects = 0
        self.closed: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.invalid_messages: Counter[str] = Counter()
        self.open_by_brand: Counter[str] = Counter()
        """Open streams per brand (a brand leaves at 0, so this holds only brands online)."""
        self.max_brands = max_brands
        # The first brands seen keep their label for the life of the process: a series that
        # moved to `other` and back would break every rate() over it.
        self.labelled_brands: set[str] = set()
        self.latency: dict[str, LatencyHistogram] = {}
        # name -> (help, read function); read at scrape time so nothing is kept twice.
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}
        self.labelled_gauges: dict[str, tuple[str, str, Callable[[], Mapping[str, float]]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read()` gives at scrape time; `name` without the prefix."""
        self.gauges[PREFIX + name] = (help_text, read)

    def labelled_gauge(
        self, name: str, help_text: str, label: str, read: Callable[[], Mapping[str, float]]
    ) -> None:
        """A gauge with one label, `read()` giving {label value: value} at scrape time."""
        self.labelled_gauges[PREFIX + name] = (help_text, label, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (by the broker, the heartbeats), read at scrape time;
        `name` without the prefix, with `_total`."""
        self.counters[PREFIX + name] = (help_text, read)

    def stream_opened(self, brand: str) -> None:
        self.opened += 1
        self.open_by_brand[brand] += 1
        if brand not in self.labelled_brands and len(self.labelled_brands) < self.max_brands:
            self.labelled_brands.add(brand)

    def stream_closed(self, brand: str, reason: str) -> None:
        self.closed[reason] += 1
        left = self.open_by_brand[brand] - 1
        if left > 0:
            self.open_by_brand[brand] = left
        else:
            del self.open_by_brand[brand]

    def observe_latency(self, event_type: str, seconds: float, streams: int) -> None:
        """`streams` frames of `event_type` were written `seconds` after their publish stamp
        (one write call for all: the same latency for each); below 0 (clocks apart) counts as 0."""
        if seconds < 0.0:
            seconds = 0.0
        histogram = self.latency.get(event_type)
        if histogram is None:
            if len(self.latency) >= MAX_EVENT_TYPES:
                event_type = OTHER
            histogram = self.latency.setdefault(event_type, LatencyHistogram())
        # `le` buckets: a value equal to a bound belongs to that bound's bucket.
        histogram.counts[bisect_left(LATENCY_BUCKETS, seconds)] += streams
        histogram.sum += seconds * streams

    def connections_by_brand(self) -> dict[str, int]:
        """Open streams per brand label: the labelled brands, the rest summed under `other`
        (always there, at 0 before any stream: a dashboard shows 0, not "no data")."""
        shown: dict[str, int] = dict.fromkeys(self.labelled_brands, 0)
        shown.setdefault(OTHER, 0)
        for brand, count in self.open_by_brand.items():
            label = brand if brand in self.labelled_brands else OTHER
            shown[label] = shown.get(label, 0) + count
        return shown


class GatewayCollector(Collector):
    """Reads a `Metrics` at scrape time as prometheus-client metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        for name, (help_text, read) in sorted(m.gauges.items()):
            yield GaugeMetricFamily(name, help_text, value=read())
        for name, (help_text, label, read_all) in sorted(m.labelled_gauges.items()):
            family = GaugeMetricFamily(name, help_text, labels=[label])
            for key, found in sorted(read_all().items()):
                family.add_metric([key], found)
            yield family
        for name, (help_text, read) in sorted(m.counters.items()):
            yield CounterMetricFamily(name, help_text, value=read())
        brands = GaugeMetricFamily(
            PREFIX + "connections", "Open SSE streams, by brand.", labels=["brand"]
        )
        for brand, count in sorted(m.connections_by_brand().items()):
            brands.add_metric([brand], count)
        yield brands
        yield _counter("connections_opened_total", "SSE streams accepted.", m.opened)
        closed = Counter(dict.fromkeys(CLOSE_REASONS, 0))
        for reason, count in m.closed.items():
            closed[_CLOSE_LABELS.get(reason, reason)] += count
        yield _labelled("connections_closed_total", "SSE streams ended, by reason.", closed)
        yield _labelled(
            "connections_rejected_total",
            "Requests refused on /v1/sse, and by the HTTP layer on any path, by error code.",
            m.rejected,
        )
        yield _counter(
            "events_received_total", "Messages read from the broker.", m.messages_received
        )
        yield _counter("events_delivered_total", "Event frames written to streams.", m.delivered)
        yield _labelled(
            "events_dropped_total", "Published messages dropped as invalid.", m.invalid_messages
        )
        yield _counter("events_replayed_total", "Events sent from history.", m.replayed_events)
        yield _counter("events_published_total", "Events published through the API.", m.published)
        yield _labelled("replays_total", "Last-Event-ID replays, by outcome.", m.replays, "outcome")
        yield _labelled(
            "refills_total",
            "Channel refills from history after a broker outage, by outcome.",
            m.refills,
            "outcome",
        )
        yield _counter(
            "broker_reconnects_total",
            "Broker connections re-established.",
            m.broker_reconnects,
        )
        yield self._latency()

    def _latency(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            PREFIX + "delivery_latency_seconds",
            "Publish stamp to frame written on a stream's socket, by event type.",
            labels=["event"],
        )
        bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
        for event_type, histogram in sorted(self._m.latency.items()):
            running = 0
            buckets = []
            for bound, count in zip(bounds, histogram.counts, strict=True):
                running += count
                buckets.append((bound, float(running)))
            family.add_metric([event_type], buckets, histogram.sum)
        return family


def _counter(name: str, help_text: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, help_text, value=value)


def _labelled(
    name: str, help_text: str, values: Counter[str], label: str = "reason"
) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, help_text, labels=[label])
    for key, count in sorted(values.items()):
        family.add_metric([key], count)
    return family


class Exposition:
    """The `/metrics` answer: this process's metrics and prometheus-client's process collector
    (RSS, open fds, the fd limit, CPU seconds), in a registry of its own."""

    def __init__(self, metrics: Metrics) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.gateway = GatewayCollector(metrics)
        self.registry.register(self.gateway)
        self.process = ProcessCollector(registry=self.registry)
        """Reads /proc: safe off the event loop (a worker's snapshots collect it in a thread)."""

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) for a scraper's `Accept` header: OpenMetrics when asked."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class EventLoopLag:
    """`sse_gateway_event_loop_lag_seconds`: how late the last timer due every `period`
    seconds fired. A loop busy for 80 ms answers every socket 80 ms late; this shows it."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.lag = 0.0
        """Seconds, from the last tick."""
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.period
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self.lag = max(0.0, now - self._due)
        self._due = now + self.period
        self._handle = loop.call_at(self._due, self._tick, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
