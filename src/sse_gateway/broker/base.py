"""The broker interface the hub talks to.

The hub reference-counts channels and calls `subscribe` for a channel's first local client and
`unsubscribe` after its last; a broker only tracks which channels are wanted. `when_subscribed`
lets a connection write `connected` only once its channel's subscription is really active.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

MessageHandler = Callable[[bytes, bytes], None]
"""Called with (channel, payload) for every message of a subscribed channel."""

StateHandler = Callable[[bool], None]
"""Called with True when the broker connection is up, False when it is lost."""


class BrokerUnavailable(Exception):
    """A publish that could not be handed to the broker; the caller knows it was not stored."""


class Broker(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def description(self) -> str: ...

    async def start(self) -> None:
        """Begins connecting; returns without waiting for the connection."""

    async def close(self) -> None: ...

    def subscribe(self, channel: bytes) -> None: ...

    def unsubscribe(self, channel: bytes) -> None: ...

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        """Calls `callback` once the subscription to a wanted channel is active (maybe now)."""

    async def publish(self, channel: bytes, payload: bytes) -> int:
        """Publishes; returns how many gateway processes received it. BrokerUnavailable."""
