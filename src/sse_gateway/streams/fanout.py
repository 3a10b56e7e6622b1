"""Fanout: each message the broker read becomes one frame (as an HTTP/1.1 chunk), written to
the player's streams."""

from __future__ import annotations

import logging
import time

from sse_gateway.metrics import Metrics
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.wire.envelope import EnvelopeError, event_frame

log = logging.getLogger("sse_gateway")
_now = time.time


class Fanout:
    """The broker's message handler: parse and encode once, the same bytes for every stream."""

    __slots__ = ("_hub", "_max_event_bytes", "_metrics")

    def __init__(self, hub: ConnectionHub, metrics: Metrics, max_event_bytes: int) -> None:
        self._hub = hub
        self._metrics = metrics
        self._max_event_bytes = max_event_bytes

    def on_message(self, channel: bytes, payload: bytes) -> None:
        """One Pub/Sub message (channel, envelope JSON). A bad message is dropped with a
        warning and `sse_gateway_events_dropped_total{reason}`; nothing a publisher sends raises."""
        metrics = self._metrics
        metrics.messages_received += 1
        try:
            # One chunk per message, whatever the number of streams (see `streams.stream`).
            frame, event_id, event_type, stamp = event_frame(payload, self._max_event_bytes, True)
        except EnvelopeError as exc:
            metrics.invalid_messages[exc.reason] += 1
            log.warning(
                "invalid published message dropped: channel=%s reason=%s detail=%s",
                channel.decode("utf-8", "replace"),
                exc.reason,
                exc,
            )
            return
        except Exception:
            # Whatever a publisher sends must never take down the shared Pub/Sub reader.
            metrics.invalid_messages["unencodable"] += 1
            log.exception(
                "invalid published message dropped: channel=%s reason=unencodable",
                channel.decode("utf-8", "replace"),
            )
            return
        written = self._hub.deliver(channel, frame, event_id)
        metrics.delivered += written
        if written and stamp is not None:
            # Every frame went to its socket in this one call: one latency for all of them.
            metrics.observe_latency(event_type, _now() - stamp, written)
