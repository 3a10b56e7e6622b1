"""ConnectionHub: which local streams listen to which channel, and fan-out to them.

Channels are reference-counted by the list of streams that joined them: the broker hears
`subscribe` for the first and `unsubscribe` after the last. Each stream decides by its own
state what a live event means to it (written, held during its replay, or not yet for it); a
whole channel's live events are held instead while it refills a gap after a broker outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from sse_gateway.broker.base import Broker
from sse_gateway.streams.stream import HeldEvent
from sse_gateway.wire.ids import StreamId, format_stream_id, parse_stream_id
from sse_gateway.wire.naming import channel_name

Held = list[HeldEvent]


class Subscriber(Protocol):
    """What the hub needs of a stream (`streams.stream.Stream` is one)."""

    @property
    def channel(self) -> bytes: ...

    def forget_floor(self) -> None:
        """The history restarted: ids at or below `floor` are new events now."""

    def deliver(self, frame: bytes, event_id: str | None, parsed: StreamId | None) -> int:
        """Takes one live event; 1 when it was written, else 0."""

    def close(self, reason: str, *, abort: bool = False, final: bytes = b"") -> None: ...


class Channel:
    """One player's channel on this process: its streams and what it last delivered."""

    __slots__ = (
        "generation",
        "held",
        "joined_at",
        "last",
        "name",
        "segments",
        "since_ms",
        "streams",
    )

    def __init__(self, name: bytes, since_ms: int) -> None:
        self.name = name
        self.streams: list[Subscriber] = []
        # When each of `streams` joined (Unix seconds, same order): who is online since when.
        self.joined_at: list[float] = []
        # The newest history id delivered here, and when (broker clock) the channel began:
        # together they say where a gap after a broker outage starts.
        self.last: StreamId | None = None
        self.since_ms = since_ms
        # While not None, live events wait here: a refill from history is under way.
        self.held: Held | None = None
        # Bumped at every broker outage: each outage's refill knows which events are its own.
        self.generation = 0
        # When an outage begins while an earlier one's refill is still due, the events held
        # since that earlier outage's resubscription are set aside here, by generation: they
        # follow that refill's read without a hole; what is held later may not.
        self.segments: dict[int, Held] | None = None

    def gap_start(self) -> str:
        """The first history id a refill must read: the last delivered one, or the start."""
        return format_stream_id(self.last) if self.last is not None else f"{self.since_ms}-0"

    def hold(self) -> int:
        """A broker outage began: hold live events; returns the generation of its refill."""
        if self.held is not None:
            if self.segments is None:
                self.segments = {}
            self.segments[self.generation] = self.held
        self.held = []
        self.generation += 1
        return self.generation

    def pending(self, generation: int) -> bool:
        """Whether the refill of `generation` still has events to write (a newer refill that
        wrote took every older generation's events with it)."""
        if self.held is None:
            return False
        return generation == self.generation or (
            self.segments is not None and generation in self.segments
        )

    def take(self, generation: int) -> Held:
        """The events held for `generation` and every older one, oldest first. For the
        current generation the channel stops holding; for an older one it goes on holding
        (a newer outage's refill is still due)."""
        taken: Held = []
        segments = self.segments
        if segments:
            for older in sorted(g for g in segments if g <= generation):
                taken.extend(segments.pop(older))
            if not segments:
                self.segments = None
        if generation == self.generation and self.held is not None:
            taken.extend(self.held)
            self.held = None
        return taken

    def release(self) -> Held:
        """Every refill is done or given up: stop holding; returns all that was held."""
        taken = self.take(self.generation)
        self.held = None
        self.segments = None
        return taken

    def advance(self, last: StreamId | None) -> None:
        """The newest history id delivered, after a refill wrote events up to it."""
        self.last = last

    def write(self, frame: bytes, event_id: str | None, parsed: StreamId | None) -> int:
        """One event to every stream of the channel; returns how many wrote it."""
        sent = 0
        streams = self.streams
        # A copy when several: a send may close a slow stream, which removes it from the list.
        for stream in streams if len(streams) == 1 else tuple(streams):
            sent += stream.deliver(frame, event_id, parsed)
        return sent


class ConnectionHub:
    __slots__ = ("_broker", "_channels")

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._channels: dict[bytes, Channel] = {}

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def intern(self, name: bytes) -> bytes:
        """The channel name to give a new stream: the joined channel's own bytes object when
        there is one, so that every stream of a player shares it."""
        channel = self._channels.get(name)
        return name if channel is None else channel.name

    def join(self, stream: Subscriber, on_ready: Callable[[], None]) -> Channel:
        """Adds a stream to its channel; `on_ready` runs once the subscription is active."""
        name = stream.channel
        channel = self._channels.get(name)
        if channel is None:
            channel = Channel(name, self._broker.redis_time_ms())
            self._channels[name] = channel
            self._broker.subscribe(name)
        channel.streams.append(stream)
        channel.joined_at.append(time.time())
        self._broker.when_subscribed(channel.name, on_ready)
        return channel

    def leave(self, stream: Subscriber) -> None:
        channel = self._channels.get(stream.channel)
        if channel is None:
            return
        try:
            index = channel.streams.index(stream)
        except ValueError:
            return
        del channel.streams[index]
        del channel.joined_at[index]
        if not channel.streams:
            del self._channels[channel.name]
            self._broker.unsubscribe(channel.name)

    def get(self, name: bytes) -> Channel | None:
        return self._channels.get(name)

    def channels(self) -> Iterator[Channel]:
        return iter(tuple(self._channels.values()))

    def deliver(self, name: bytes, frame: bytes, event_id: str | None) -> int:
        """Writes one encoded frame to every live stream of the channel; returns how many."""
        channel = self._channels.get(name)
        if channel is None:
            return 0
        if channel.held is not None:
            channel.held.append(HeldEvent(event_id, frame))
            return 0
        parsed = None
        if event_id is not None:
            parsed = parse_stream_id(event_id)
            if parsed is not None:
                if channel.last is not None and parsed <= channel.last:
                    return 0  # a late live copy of an event already refilled from history
                channel.last = parsed
        return channel.write(frame, event_id, parsed)

    def streams(self) -> list[Subscriber]:
        return [stream for channel in self._channels.values() for stream in channel.streams]

    def streams_of(self, brand_id: str, player_id: str | None = None) -> list[Subscriber]:
        """The streams of one player, or of a whole brand (`player_id` None: every channel
        is looked at, which a rare operator command can afford)."""
        if player_id is not None:
            channel = self._channels.get(channel_name(brand_id, player_id))
            return [] if channel is None else list(channel.streams)
        prefix = channel_name(brand_id, "")
        return [
            stream
            for name, channel in self._channels.items()
            if name.startswith(prefix)
            for stream in channel.streams
        ]
