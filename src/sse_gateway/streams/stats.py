"""This process at a glance (`GET /v1/stats`): streams per brand, channels, events per second.

The rates cost nothing per event: a timer reads the metrics counters (events received from
the broker, frames delivered) once a second into a ring of `WINDOW_SECONDS` samples, and a
rate is the counter's change from the ring's oldest sample to now.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable

from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.wire.naming import split_channel

WINDOW_SECONDS = 60


class RateWindow:
    """Samples of an ever-growing counter, one a second, the last `seconds` of them."""

    __slots__ = ("_samples",)

    def __init__(self, seconds: int = WINDOW_SECONDS) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=seconds)

    def sample(self, now: float, value: int) -> None:
        """The counter's `value` at `now` (monotonic seconds). A value below the last one
        means the counter restarted: the older samples mean nothing any more."""
        if self._samples and value < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((now, value))

    def rate(self, now: float, value: int) -> float:
        """Per second, from the oldest sample (at most `seconds` old) to `value` at `now`;
        0.0 without a sample or time between."""
        if not self._samples:
            return 0.0
        then, old = self._samples[0]
        if now <= then or value < old:
            return 0.0
        return (value - old) / (now - then)


class GatewayStats:
    def __init__(
        self,
        *,
        hub: ConnectionHub,
        instance: str,
        open_streams: Callable[[], int],
        received: Callable[[], int],
        delivered: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`open_streams()`: streams not yet closed; `received()`, `delivered()`: the counters
        of events read from the broker and frames written to streams."""
        self._hub = hub
        self.instance = instance
        self._open_streams = open_streams
        self._received = received
        self._delivered = delivered
        self._clock = clock
        self._received_rate = RateWindow()
        self._delivered_rate = RateWindow()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        now = self._clock()
        self._received_rate.sample(now, self._received())
        self._delivered_rate.sample(now, self._delivered())
        self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    def connections_by_brand(self) -> dict[str, int]:
        """Streams per brand (every channel is looked at: an operator's request affords it)."""
        brands: dict[str, int] = {}
        for channel in self._hub.channels():
            names = split_channel(channel.name)
            if names is not None and channel.streams:
                brands[names[0]] = brands.get(names[0], 0) + len(channel.streams)
        return brands

    def snapshot(self) -> dict[str, object]:
        """The body of `GET /v1/stats` (docs/api.md)."""
        now = self._clock()
        return {
            "pid": os.getpid(),
            "instance": self.instance,
            "connections": self._open_streams(),
            "connections_by_brand": self.connections_by_brand(),
            "subscribed_channels": self._hub.channel_count,
            "events_received_per_second": round(self._received_rate.rate(now, self._received()), 3),
            "events_delivered_per_second": round(
                self._delivered_rate.rate(now, self._delivered()), 3
            ),
            "window_seconds": WINDOW_SECONDS,
        }
