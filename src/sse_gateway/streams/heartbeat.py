"""One heartbeat scheduler for every stream of the process.

Streams are spread over the slots of a ring that turns once per keep-alive period; each tick
writes one slot. A new stream joins a random slot, so 50k streams cost 50k/slots writes per
tick, not 50k at once, even when they all connected in the same instant.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol

from sse_gateway.wire.frames import chunk, encode_event

MAX_TICK_SECONDS = 0.1


class Beating(Protocol):
    hb_slot: int

    def heartbeat(self, frame: bytes) -> bool:
        """Writes the frame; False when the stream skipped it."""


def heartbeat_frame(now_ms: int) -> bytes:
    """The heartbeat event, as the chunk every stream takes (see `streams.stream`)."""
    return chunk(encode_event("heartbeat", f'{{"ts":{now_ms}}}'))


class HeartbeatScheduler:
    def __init__(self, period: float, clock: Callable[[], float] = time.time) -> None:
        self.period = period
        self.slot_count = max(1, round(period / MAX_TICK_SECONDS)) if period > 1 else 10
        self.tick = period / self.slot_count
        self._slots: list[set[Beating]] = [set() for _ in range(self.slot_count)]
        self._current = 0
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._next_at = 0.0
        self.sent = 0
        """Heartbeat frames written (sse_gateway_heartbeats_sent_total)."""

    def add(self, stream: Beating) -> None:
        # A random slot: streams that arrive together (a reconnect storm) are spread over the
        # period instead of all beating in the same tick. The first beat comes within a period.
        slot = random.randrange(self.slot_count)
        stream.hb_slot = slot
        self._slots[slot].add(stream)

    def remove(self, stream: Beating) -> None:
        self._slots[stream.hb_slot].discard(stream)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_at = loop.time() + self.tick
        self._handle = loop.call_at(self._next_at, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        slot = self._slots[self._current]
        self._current = (self._current + 1) % self.slot_count
        if slot:
            frame = heartbeat_frame(int(self._clock() * 1000))
            sent = 0
            for stream in tuple(slot):
                sent += stream.heartbeat(frame)
            self.sent += sent
        # Scheduled from the ideal time, not from now, so the ring does not drift; if the loop
        # fell far behind, skip ahead instead of firing a burst of late ticks.
        self._next_at += self.tick
        now = loop.time()
        if self._next_at < now - self.period:
            self._next_at = now + self.tick
        self._handle = loop.call_at(self._next_at, self._fire)
