"""ConnectionHub: which local streams listen to which channel, and fan-out to them.

Channels are reference-counted by the list of streams that joined them: the broker hears
`subscribe` for the first and `unsubscribe` after the last. A stream receives events only once
it is active (its `connected` frame written), so no event can overtake `connected`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .broker.base import Broker


class Stream(Protocol):
    channel: bytes
    active: bool

    def send(self, frame: bytes) -> None: ...


class ConnectionHub:
    __slots__ = ("_broker", "_members", "delivered")

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._members: dict[bytes, list[Stream]] = {}
        self.delivered = 0

    @property
    def channel_count(self) -> int:
        return len(self._members)

    def join(self, stream: Stream, on_ready: Callable[[], None]) -> bytes:
        """Adds a stream; `on_ready` runs once its channel's subscription is active.

        Returns the hub's own copy of the channel name so every stream of a player shares it.
        """
        members = self._members.get(stream.channel)
        if members is None:
            self._members[stream.channel] = members = []
            self._broker.subscribe(stream.channel)
        else:
            stream.channel = members[0].channel
        members.append(stream)
        self._broker.when_subscribed(stream.channel, on_ready)
        return stream.channel

    def leave(self, stream: Stream) -> None:
        members = self._members.get(stream.channel)
        if members is None:
            return
        try:
            members.remove(stream)
        except ValueError:
            return
        if not members:
            del self._members[stream.channel]
            self._broker.unsubscribe(stream.channel)

    def has_listeners(self, channel: bytes) -> bool:
        return channel in self._members

    def deliver(self, channel: bytes, frame: bytes) -> int:
        """Writes one encoded frame to every active stream of the channel."""
        members = self._members.get(channel)
        if not members:
            return 0
        sent = 0
        # A copy: a send may close a slow stream, which removes it from the list.
        for stream in tuple(members):
            if stream.active:
                stream.send(frame)
                sent += 1
        self.delivered += sent
        return sent

    def streams(self) -> list[Stream]:
        return [stream for members in self._members.values() for stream in members]
