"""Embedded in-memory broker: a single process, no Redis. For development and tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .base import MessageHandler, StateHandler


class MemoryBroker:
    def __init__(self, on_message: MessageHandler, on_state: StateHandler) -> None:
        self._on_message = on_message
        self._on_state = on_state
        self._channels: set[bytes] = set()
        self._running = False

    @property
    def connected(self) -> bool:
        return self._running

    @property
    def description(self) -> str:
        return "embedded in-memory broker (single process)"

    async def start(self) -> None:
        self._running = True
        self._on_state(True)

    async def close(self) -> None:
        self._running = False

    def subscribe(self, channel: bytes) -> None:
        self._channels.add(channel)

    def unsubscribe(self, channel: bytes) -> None:
        self._channels.discard(channel)

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        callback()

    async def publish(self, channel: bytes, payload: bytes) -> int:
        if channel not in self._channels:
            return 0
        # Delivered on the next loop turn, as a message read from a socket would be.
        asyncio.get_running_loop().call_soon(self._on_message, channel, payload)
        return 1
