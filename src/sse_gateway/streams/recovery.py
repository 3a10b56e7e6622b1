"""OutageRecovery: after the Pub/Sub connection drops, refill each channel's gap from history.

Whatever is published until a channel is subscribed again is read back from its history; live
events of the channel are held (`Channel.hold`) until that refill has been written, then merged
with it, so each stream sees every event once and in order. When outages follow each other
faster than refills complete, each refill writes its read with the events held between its own
resubscription and the next outage (no hole between them), and the newest refill writes the
rest; a refill that a newer one already covered is ignored. When history provably lost events
of the gap, the channel's streams are closed with `history_gap` instead of skipping them.

On a Redis Cluster a shard's outage (or a slot that moved) loses the subscriptions of that
shard's channels only: the broker reports those channels (`on_channels_lost`), and only they
are held and refilled, the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from functools import partial

from sse_gateway.broker.base import Broker, HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.streams.history import START, HistoryReader
from sse_gateway.streams.hub import Channel, ConnectionHub
from sse_gateway.streams.stream import farewell
from sse_gateway.wire.ids import (
    ReplayMerge,
    format_stream_id,
    parse_stream_id,
)

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
        per_channel: bool = False,
    ) -> None:
        """`per_channel`: the broker reports lost channels (`on_channels_lost`, a Redis
        Cluster), and its going down loses nothing by itself."""
        self._per_channel = per_channel
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
        if self._per_channel:
            log.warning(
                "broker degraded: open streams stay open, new ones get 503",
                extra={"event": "broker_disconnected"},
            )
            return
        log.warning(
            "broker disconnected: open streams stay open, new ones get 503",
            extra={"event": "broker_disconnected"},
        )
        for channel in self._hub.channels():
            generation = channel.hold()
            self._broker.when_subscribed(channel.name, partial(self._refill, channel, generation))

    def on_channels_lost(self, names: Iterable[bytes]) -> None:
        """The subscriptions of these channels were lost (one shard of a Redis Cluster):
        each is held, and refilled once subscribed again."""
        for name in names:
            channel = self._hub.get(name)
            if channel is None:
                continue
            generation = channel.hold()
            self._broker.when_subscribed(channel.name, partial(self._refill, channel, generation))

    def _may_retry(self) -> bool:
        # A single Redis' outage holds every channel anew (a newer refill covers the gap); a
        # cluster broker can be down for another shard's sake while this channel is fine.
        return self._per_channel or self._broker.connected

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
            if self._current(channel, generation) and self._may_retry():
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
        verdict = self._history.refill_verdict(channel.last, entries)
        if verdict == "gap":
            self._history_gap(channel, "history does not cover the outage")
        elif verdict == "lost":
            # The newest id sent is gone from the history. Only a history that holds nothing
            # at or below it restarted cleanly (all it holds came after): read it all to see.
            future = self._history.read(channel.name, START)
            future.add_done_callback(partial(self._read_whole, channel, generation))
        else:
            self._metrics.refills["covered"] += 1
            self._write(channel, generation, entries)

    def _read_whole(
        self, channel: Channel, generation: int, future: asyncio.Future[list[HistoryEntry]]
    ) -> None:
        if self._hub.get(channel.name) is not channel or not channel.pending(generation):
            return
        if future.cancelled() or future.exception() is not None:
            if self._current(channel, generation) and self._may_retry():
                asyncio.get_running_loop().call_later(
                    REFILL_RETRY_SECONDS, self._refill, channel, generation
                )
            return
        try:
            entries = future.result()
            # Judged by the channel's last id now, not when the read was sent: a refill that
            # wrote meanwhile (this one was overtaken) may have advanced it, even started over.
            top = channel.last
            if top is None or any(parse_stream_id(entry.id) == top for entry in entries):
                self._metrics.refills["covered"] += 1
                self._write(channel, generation, entries)
                return
            below = any((parse_stream_id(entry.id) or top) <= top for entry in entries)
            if below or len(entries) > self._history.history_size:
                # Ids went back (an older snapshot, a clock set back, deleted entries): which
                # of these the streams already have cannot be told, so they are told instead.
                self._history_gap(channel, f"history went back past {format_stream_id(top)}")
                return
            log.warning(
                "history of %s restarted (its newest id sent, %s, is gone and nothing older "
                "is left): starting over from what it holds",
                channel.name.decode("utf-8", "replace"),
                format_stream_id(top),
            )
            self._metrics.refills["history_restarted"] += 1
            # The new history's ids owe nothing to the old ones (a clock behind the old Redis
            # gives lower ones): no id sent before may hide what it holds or adds from now on.
            channel.advance(None)
            for stream in channel.streams:
                stream.forget_floor()
            self._write(channel, generation, entries)
        except Exception:
            self._give_up(channel, "the refill")

    def _write(self, channel: Channel, generation: int, entries: list[HistoryEntry]) -> None:
        merge = ReplayMerge(channel.last)
        events = merge.merge(self._history.events(channel.name, entries), channel.take(generation))
        channel.advance(merge.last)
        delivered = 0
        for event_id, frame in events:
            delivered += channel.write(frame, event_id, parse_stream_id(event_id))
        self._metrics.delivered += delivered

    def _history_gap(self, channel: Channel, why: str) -> None:
        # History no longer reaches back to the gap: say so rather than skip events silently.
        # Reconnecting clients get `recovered: false` and refetch their state.
        self._metrics.refills["history_gap"] += 1
        channel.release()
        log.warning(
            "%s of %s; closing its %d streams",
            why,
            channel.name.decode("utf-8", "replace"),
            len(channel.streams),
        )
        for stream in tuple(channel.streams):
            stream.close("history_gap", final=farewell("history_gap", self._retry_ms))

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
            stream.close("error", final=farewell("error", self._retry_ms))
