"""One session-expiry timer for every stream of the process.

A stream lives only as long as the token it was opened with is accepted (`Identity.
valid_until`: its `exp` plus the clock leeway). Deadlines are rounded up to whole seconds and
kept in one heap, with one event-loop timer armed for the earliest: 50k streams cost one
heap entry each and one timer in all, and the streams whose tokens end in the same second
are closed in one firing. A stream that closes first is only marked (its `expires_at` back to
0); the heap is rebuilt without such entries once they outnumber the live ones, so that it
never holds more than about twice the open streams, however many come and go.

Deadlines are wall-clock times (a token's `exp`), the timer runs on the loop's monotonic
clock: the timer sleeps at most `MAX_SLEEP_SECONDS` at a time, so that a wall clock set
forward is noticed within that.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

MAX_SLEEP_SECONDS = 60.0
# Stale entries are swept out only past this many, so that small heaps are never rebuilt.
MIN_SWEEP = 64


class Expiring(Protocol):
    expires_at: float
    """The deadline as the heap holds it; 0.0: not in the heap (set by `SessionExpiry`)."""


S = TypeVar("S", bound=Expiring)


class SessionExpiry(Generic[S]):
    """Calls `expire(stream)` once each stream's deadline has passed, unless it was removed."""

    __slots__ = ("_armed_at", "_clock", "_expire", "_handle", "_heap", "_live", "_seq", "_stale")

    def __init__(
        self, expire: Callable[[S], None], clock: Callable[[], float] | None = None
    ) -> None:
        """`clock` is the wall clock deadlines are read against (seconds since the epoch);
        `time.time` by default."""
        self._expire = expire
        self._clock = time.time if clock is None else clock
        # (deadline, tie-breaker, stream): the counter keeps streams themselves uncompared.
        self._heap: list[tuple[int, int, S]] = []
        self._seq = itertools.count()
        self._live = 0
        self._stale = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf  # the wall time the armed timer fires at

    def __len__(self) -> int:
        """Streams waiting for their deadline."""
        return self._live

    @property
    def heap_size(self) -> int:
        """Entries in the heap, stale ones included (at most about twice `len(self)`)."""
        return len(self._heap)

    def add(self, stream: S, deadline: float) -> None:
        """Schedules `stream` to expire at `deadline` (wall clock, seconds; rounded up to the
        next whole second). Once per stream."""
        second = math.ceil(deadline)
        stream.expires_at = float(second)
        heapq.heappush(self._heap, (second, next(self._seq), stream))
        self._live += 1
        if second < self._armed_at:
            self._arm(second)

    def remove(self, stream: S) -> None:
        """The stream closed before its deadline: it will not be expired. Idempotent."""
        if not stream.expires_at:
            return
        stream.expires_at = 0.0
        self._live -= 1
        self._stale += 1
        if self._stale > MIN_SWEEP and self._stale > self._live:
            self._heap = [entry for entry in self._heap if entry[2].expires_at]
            heapq.heapify(self._heap)
            self._stale = 0

    def expire_due(self) -> int:
        """Expires every stream whose deadline has passed; returns how many."""
        now = self._clock()
        heap = self._heap
        expired = 0
        while heap and heap[0][0] <= now:
            _, _, stream = heapq.heappop(heap)
            if not stream.expires_at:
                self._stale -= 1
                continue
            stream.expires_at = 0.0
            self._live -= 1
            expired += 1
            self._expire(stream)
        return expired

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = math.inf

    def _arm(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        delay = min(max(0.0, deadline - self._clock()), MAX_SLEEP_SECONDS)
        self._armed_at = self._clock() + delay
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        try:
            self.expire_due()
        finally:
            # Rearmed even if closing a stream raised: the other streams must still expire.
            if self._heap:
                self._arm(self._heap[0][0])
