"""Embedded in-memory broker: a single process, no Redis. For development and tests.

It keeps history like the Redis broker does (capped per player, expiring after the last
event), so publishing and Last-Event-ID replay behave the same without Redis; blocks and
connect tickets too (in memory, expiring like Redis keys with a TTL).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable

from sse_gateway.broker.base import (
    BrokerUnavailable,
    ControlHandler,
    DisconnectOutcome,
    HistoryEntry,
    MessageHandler,
    StateHandler,
)
from sse_gateway.publish.events import PreparedEvent, PublishedEvent
from sse_gateway.wire.ids import StreamId, format_stream_id, parse_stream_id

SWEEP_SECONDS = 60.0
# Tickets live 30 s: this many outstanding ones is a client minting them in a loop, and
# memory must not follow it.
MAX_TICKETS = 100_000


class _History:
    __slots__ = ("entries", "expires_at")

    def __init__(self, size: int) -> None:
        # One more than the size, as publish.lua keeps: see the comment there.
        self.entries: deque[tuple[StreamId, HistoryEntry]] = deque(maxlen=size + 1)
        self.expires_at = 0.0


class MemoryBroker:
    def __init__(
        self,
        *,
        history_size: int = 100,
        history_ttl: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` (seconds) times blocks and tickets; tests give a fake one."""
        self._on_message: MessageHandler | None = None
        self._on_control: ControlHandler | None = None
        self._clock = clock
        # Key -> when it expires (`clock`); a block without expiry is not made here.
        self._blocks: dict[bytes, float] = {}
        self._tickets: dict[bytes, tuple[bytes, float]] = {}
        self._channels: set[bytes] = set()
        self._running = False
        self._history: dict[bytes, _History] = {}
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._last_id: StreamId = (0, 0)
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self._running

    @property
    def description(self) -> str:
        return "embedded in-memory broker (single process)"

    @property
    def subscribe_batches(self) -> int:
        return 0  # in-process: no commands

    @property
    def unsubscribe_batches(self) -> int:
        return 0

    @property
    def subscribed_count(self) -> int:
        return len(self._channels)

    async def start(
        self,
        on_message: MessageHandler,
        on_state: StateHandler,
        on_control: ControlHandler | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_control = on_control
        self._running = True
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        on_state(True)

    async def close(self) -> None:
        self._running = False
        if self._sweeper is not None:
            self._sweeper.cancel()

    def subscribe(self, channel: bytes) -> None:
        self._channels.add(channel)

    def unsubscribe(self, channel: bytes) -> None:
        self._channels.discard(channel)

    def when_subscribed(self, channel: bytes, callback: Callable[[], None]) -> None:
        callback()

    def redis_time_ms(self) -> int:
        return int(time.time() * 1000)

    def _next_id(self) -> StreamId:
        # Redis stream ids: milliseconds, then a sequence within the same millisecond.
        now = int(time.time() * 1000)
        last_ms, last_seq = self._last_id
        self._last_id = (now, 0) if now > last_ms else (last_ms, last_seq + 1)
        return self._last_id

    async def publish_events(self, events: list[PreparedEvent]) -> list[PublishedEvent]:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        results = []
        for event in events:
            stream_id = self._next_id()
            event_id = format_stream_id(stream_id)
            history = self._history.get(event.channel)
            if history is None or history.expires_at <= now:
                self._history[event.channel] = history = _History(self._history_size)
            history.entries.append((stream_id, HistoryEntry(event_id, event.type, event.data_json)))
            history.expires_at = now + self._history_ttl
            envelope = (
                f'{{"type":{json.dumps(event.type)},"data":{event.data_json},'
                f'"id":"{event_id}","ts":{time.time():.6f}}}'
            )
            receivers = 0
            if event.channel in self._channels and self._on_message is not None:
                # Delivered on a later loop turn, as a message read from a socket would be.
                loop.call_soon(self._on_message, event.channel, envelope.encode("utf-8"))
                receivers = 1
            results.append(PublishedEvent(event_id, receivers))
        return results

    async def read_history(
        self, requests: list[tuple[bytes, str]], limit: int
    ) -> list[list[HistoryEntry]]:
        now = time.monotonic()
        out: list[list[HistoryEntry]] = []
        for channel, start in requests:
            history = self._history.get(channel)
            start_id = parse_stream_id(start) or (0, 0)
            if history is None or history.expires_at <= now:
                out.append([])
                continue
            entries = [entry for sid, entry in history.entries if sid >= start_id]
            out.append(entries[:limit])
        return out

    async def read_heads(self, channels: list[bytes]) -> tuple[list[str | None], int]:
        now_ms = self._last_id[0]  # ids never go back: later entries are above it
        now = time.monotonic()
        heads: list[str | None] = []
        for channel in channels:
            history = self._history.get(channel)
            if history is None or history.expires_at <= now or not history.entries:
                heads.append(None)
            else:
                heads.append(history.entries[-1][1].id)
        return heads, max(now_ms, int(time.time() * 1000))

    # --- session control ---------------------------------------------------------------------

    async def publish_disconnect(
        self, message: bytes, block_key: bytes, block_ms: int, block_value: bytes
    ) -> DisconnectOutcome:
        now = self._clock()
        left = self._blocks.get(block_key, 0.0) - now
        if block_ms > 0 and left * 1000 < block_ms:
            self._blocks[block_key] = now + block_ms / 1000
            left = block_ms / 1000
        receivers = 0
        if self._on_control is not None:
            asyncio.get_running_loop().call_soon(self._on_control, message)
            receivers = 1
        return DisconnectOutcome(receivers, int(left * 1000) if left > 0 else None)

    async def publish_control(self, message: bytes) -> int:
        if self._on_control is None:
            return 0
        asyncio.get_running_loop().call_soon(self._on_control, message)
        return 1

    async def count_subscribers(self, channel: bytes) -> int:
        return 1 if channel in self._channels else 0

    async def read_block_index(self) -> list[tuple[bytes, float]]:
        now = self._clock()
        return [(key, ends - now) for key, ends in self._blocks.items() if ends > now]

    async def read_blocks(self, keys: list[tuple[bytes, bytes]]) -> list[bool]:
        now = self._clock()
        blocks = self._blocks
        return [blocks.get(brand, 0.0) > now or blocks.get(own, 0.0) > now for brand, own in keys]

    async def put_ticket(self, key: bytes, value: bytes, ttl: int) -> None:
        if len(self._tickets) >= MAX_TICKETS:
            self._sweep_tickets()
            if len(self._tickets) >= MAX_TICKETS:
                raise BrokerUnavailable(f"{MAX_TICKETS} tickets outstanding")
        self._tickets[key] = (value, self._clock() + ttl)

    async def take_ticket(self, key: bytes) -> bytes | None:
        found = self._tickets.pop(key, None)
        if found is None or found[1] <= self._clock():
            return None
        return found[0]

    def _sweep_tickets(self) -> None:
        now = self._clock()
        for key in [k for k, (_, expires) in self._tickets.items() if expires <= now]:
            del self._tickets[key]

    def _sweep(self) -> None:
        now = time.monotonic()
        for channel in [c for c, h in self._history.items() if h.expires_at <= now]:
            del self._history[channel]
        self._sweep_tickets()
        clock_now = self._clock()
        for key in [k for k, expires in self._blocks.items() if expires <= clock_now]:
            del self._blocks[key]
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
