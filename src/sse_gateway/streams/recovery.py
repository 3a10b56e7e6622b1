"""OutageRecovery: after the Pub/Sub connection drops, refill each channel's gap from history.

Whatever is published until a channel is subscribed again is read back from its history; live
events of the channel are held (`Channel.hold`) until that refill has been written, then merged
with it, so each stream sees every event once and in order. When outages follow each other
faster than refills complete, each refill writes its read with the events held between its own
resubscription and the next outage (no hole between them), and the newest refill writes the
rest; a refill that a newer one already covered is ignored. When history provably lost events
of the gap, the channel's streams are closed with `history_gap` instead of skipping them.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from sse_gateway.broker.base import Broker, HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.streams.history import HistoryReader
from sse_gateway.streams.hub import Channel, ConnectionHub
from sse_gateway.streams.stream import closing_retry
from sse_gateway.wire.ids import ReplayMerge, parse_stream_id

log = logging.getLogger("sse_gateway")

REFILL_RETRY_SECONDS = 1.0


class OutageRecovery:
    """The broker's state handler: counts reconnects and refills channels after a drop."""

    def __init__(
        self,
        *,
        broker: Broker,
        hub: ConnectionHub,
        history: HistoryReader,
        metrics: Metrics,
        retry_ms: int,
    ) -> None:
        self._broker = broker
        self._hub = hub
        self._history = history
        self._metrics = metrics
        self._retry_ms = retry_ms
        self._ever_connected = False

    def on_broker_state(self, connected: bool) -> None:
        """True: the broker (re)connected. False: it dropped; every channel's refill is
        registered to run once the channel is subscribed again."""
        if connected:
            if self._ever_connected:
                self._metrics.broker_reconnects += 1
            self._ever_connected = True
            return
        log.warning("broker disconnected: open streams stay open, new ones get 503")
        for channel in self._hub.channels():
            generation = channel.hold()
            self._broker.when_subscribed(channel.name, partial(self._refill, channel, generation))

    def _current(self, channel: Channel, generation: int) -> bool:
        return channel.generation == generation and self._hub.get(channel.name) is channel

    def _refill(self, channel: Channel, generation: int) -> None:
        if not self._current(channel, generation):
            return
        try:
            future = self._history.read(channel.name, channel.gap_start())
            future.add_done_callback(partial(self._refilled, channel, generation))
        except Exception:
            self._give_up(channel, "starting the refill")

    def _refilled(
        self, channel: Channel, generation: int, future: asyncio.Future[list[HistoryEntry]]
    ) -> None:
        failed = future.cancelled() or future.exception() is not None
        if self._hub.get(channel.name) is not channel or not channel.pending(generation):
            return  # the channel is gone, or a newer refill already wrote what this one read
        if failed:
            if self._current(channel, generation) and self._broker.connected:
                # Only the read failed: try again shortly.
                asyncio.get_running_loop().call_later(
                    REFILL_RETRY_SECONDS, self._refill, channel, generation
                )
            return  # else the newer outage's refill covers this gap too
        # Written even when a newer outage began meanwhile: this read and the events held
        # between its resubscription and that outage have no hole between them, and by the
        # time the newer refill reads, the history may be trimmed past this gap's start.
        try:
            self._write_refill(channel, generation, future.result())
        except Exception:
            self._give_up(channel, "the refill")

    def _write_refill(self, channel: Channel, generation: int, entries: list[HistoryEntry]) -> None:
        if not self._history.refill_covers(channel.last, entries):
            # History no longer reaches back to the gap: say so rather than skip events
            # silently. Reconnecting clients get `recovered: false` and refetch their state.
            channel.release()
            log.warning(
                "history does not cover the outage of %s; closing its %d streams",
                channel.name.decode(),
                len(channel.streams),
            )
            for stream in tuple(channel.streams):
                stream.close("history_gap", final=closing_retry(self._retry_ms))
            return
        merge = ReplayMerge(channel.last)
        events = merge.merge(self._history.events(channel.name, entries), channel.take(generation))
        channel.advance(merge.last)
        delivered = 0
        for event_id, frame in events:
            delivered += channel.write(frame, event_id, parse_stream_id(event_id))
        self._metrics.delivered += delivered

    def _give_up(self, channel: Channel, what: str) -> None:
        """A bug must not stall a channel (its held events growing without end): stop
        holding and close its streams with a `retry:`; they come back and replay history."""
        log.exception(
            "%s of %s failed; closing its %d streams with a retry",
            what,
            channel.name.decode("utf-8", "replace"),
            len(channel.streams),
        )
        channel.release()
        for stream in tuple(channel.streams):
            stream.close("error", final=closing_retry(self._retry_ms))
