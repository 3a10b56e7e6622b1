"""ConnectionHub: which local streams listen to which channel, and fan-out to them.

Channels are reference-counted by the list of streams that joined them: the broker hears
`subscribe` for the first and `unsubscribe` after the last. A stream receives events only once
it is active (its `connected` frame written); while it replays history its live events are
held instead, and so are a whole channel's while it refills a gap after a broker outage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from sse_gateway.broker.base import Broker
from sse_gateway.wire.ids import StreamId, format_stream_id, parse_stream_id

Held = list[tuple[str | None, bytes]]


class Stream(Protocol):
    channel: bytes
    active: bool
    held: Held | None
    # After a replay: the newest id this stream was sent. Live copies of replayed events
    # that arrive late (Pub/Sub and history reads are separate sockets) are skipped.
    floor: StreamId | None

    def send(self, frame: bytes) -> None: ...


class Channel:
    """One player's channel on this process: its streams and what it last delivered."""

    __slots__ = ("generation", "held", "last", "name", "since_ms", "streams")

    def __init__(self, name: bytes, since_ms: int) -> None:
        self.name = name
        self.streams: list[Stream] = []
        # The newest history id delivered here, and when (broker clock) the channel began:
        # together they say where a gap after a broker outage starts.
        self.last: StreamId | None = None
        self.since_ms = since_ms
        # While not None, live events wait here: a refill from history is under way.
        self.held: Held | None = None
        # Bumped at every broker outage, so a refill that an outage overtook is ignored.
        self.generation = 0

    def gap_start(self) -> str:
        return format_stream_id(self.last) if self.last is not None else f"{self.since_ms}-0"

    def write(self, frame: bytes, event_id: str | None, parsed: StreamId | None) -> int:
        sent = 0
        streams = self.streams
        # A copy when several: a send may close a slow stream, which removes it from the list.
        for stream in streams if len(streams) == 1 else tuple(streams):
            if stream.active:
                floor = stream.floor
                if floor is not None and parsed is not None:
                    if parsed <= floor:
                        continue
                    stream.floor = None  # caught up: channel order suffices from here on
                stream.send(frame)
                sent += 1
            elif stream.held is not None:
                stream.held.append((event_id, frame))
        return sent


class ConnectionHub:
    __slots__ = ("_broker", "_channels")

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._channels: dict[bytes, Channel] = {}

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def join(self, stream: Stream, on_ready: Callable[[], None]) -> Channel:
        """Adds a stream; `on_ready` runs once its channel's subscription is active."""
        channel = self._channels.get(stream.channel)
        if channel is None:
            channel = Channel(stream.channel, self._broker.redis_time_ms())
            self._channels[stream.channel] = channel
            self._broker.subscribe(stream.channel)
        else:
            stream.channel = channel.name  # every stream of a player shares one bytes object
        channel.streams.append(stream)
        self._broker.when_subscribed(channel.name, on_ready)
        return channel

    def leave(self, stream: Stream) -> None:
        channel = self._channels.get(stream.channel)
        if channel is None:
            return
        try:
            channel.streams.remove(stream)
        except ValueError:
            return
        if not channel.streams:
            del self._channels[stream.channel]
            self._broker.unsubscribe(stream.channel)

    def get(self, name: bytes) -> Channel | None:
        return self._channels.get(name)

    def channels(self) -> Iterator[Channel]:
        return iter(tuple(self._channels.values()))

    def deliver(self, name: bytes, frame: bytes, event_id: str | None) -> int:
        """Writes one encoded frame to every active stream of the channel."""
        channel = self._channels.get(name)
        if channel is None:
            return 0
        if channel.held is not None:
            channel.held.append((event_id, frame))
            return 0
        parsed = None
        if event_id is not None:
            parsed = parse_stream_id(event_id)
            if parsed is not None:
                if channel.last is not None and parsed <= channel.last:
                    return 0  # a late live copy of an event already refilled from history
                channel.last = parsed
        return channel.write(frame, event_id, parsed)

    def streams(self) -> list[Stream]:
        return [stream for channel in self._channels.values() for stream in channel.streams]
