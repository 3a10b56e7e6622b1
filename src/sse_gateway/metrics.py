"""Process metrics in the Prometheus text exposition format, without a client library.

Counters are plain ints bumped on hot paths; labels are fixed small sets, rendered on scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class Metrics:
    __slots__ = (
        "broker_reconnects",
        "closed",
        "delivered",
        "gauges",
        "invalid_messages",
        "messages_received",
        "opened",
        "published",
        "refills",
        "rejected",
        "replayed_events",
        "replays",
    )

    def __init__(self) -> None:
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
        # name -> (help, read function); read at scrape time so nothing is kept twice.
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> bytes:
        lines: list[str] = []

        def counter(name: str, help_text: str, value: int) -> None:
            lines.extend(
                (f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}")
            )

        def labelled(name: str, help_text: str, label: str, values: Counter[str]) -> None:
            lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} counter"))
            lines.extend(f'{name}{{{label}="{key}"}} {n}' for key, n in sorted(values.items()))

        for name, (help_text, read) in sorted(self.gauges.items()):
            value = read()
            shown = int(value) if float(value).is_integer() else value
            lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {shown}"))
        counter("sse_connections_opened_total", "SSE streams accepted.", self.opened)
        labelled("sse_connections_closed_total", "SSE streams closed.", "reason", self.closed)
        labelled(
            "sse_connections_rejected_total",
            "Requests refused on /v1/sse, and by the HTTP layer on any path, by error code.",
            "reason",
            self.rejected,
        )
        counter(
            "sse_messages_received_total", "Messages read from the broker.", self.messages_received
        )
        labelled(
            "sse_invalid_messages_total",
            "Published messages dropped as invalid.",
            "reason",
            self.invalid_messages,
        )
        counter("sse_events_delivered_total", "Event frames written to streams.", self.delivered)
        labelled("sse_replays_total", "Last-Event-ID replays, by outcome.", "outcome", self.replays)
        counter("sse_events_replayed_total", "Events sent from history.", self.replayed_events)
        labelled(
            "sse_refills_total",
            "Channel refills from history after a broker outage, by outcome.",
            "outcome",
            self.refills,
        )
        counter("sse_events_published_total", "Events published through the API.", self.published)
        counter(
            "sse_broker_reconnects_total",
            "Broker connections re-established.",
            self.broker_reconnects,
        )
        return ("\n".join(lines) + "\n").encode("utf-8")
