"""Subscribing through a `SubscriptionBook`, written once per event-loop turn.

Both Pub/Sub adapters, `RedisBroker` (one connection) and a Redis Cluster's `ShardConnection`
(one per master), are told subscribe/unsubscribe once per stream set up or gone; the book
coalesces a turn's changes and the flush at the turn's end writes them as one batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sse_gateway.broker.subscriptions import SubscriptionBook, SubscriptionCommand


class TurnBatched:
    """The subscribe side of a Pub/Sub adapter. The adapter sets `_book`,
    `_flush_scheduled = False` and both batch counters to 0, and gives `_subscriber_up` and
    `_write` (which calls `_count_batches` for what it wrote)."""

    _book: SubscriptionBook
    _flush_scheduled: bool
    subscribe_batches: int
    """(S)SUBSCRIBE commands written (sse_gateway_broker_subscribe_batches_total)."""
    unsubscribe_batches: int

    def _subscriber_up(self) -> bool:
        raise NotImplementedError

    def _write(self, commands: Sequence[SubscriptionCommand]) -> None:
        raise NotImplementedError

    def subscribe(self, channel: bytes) -> None:
        self._book.subscribe(channel)
        # One flush per loop turn: a turn's subscribes go out as one batch. Inlined rather than
        # a helper, as this runs once per stream set up.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def unsubscribe(self, channel: bytes) -> None:
        self._book.unsubscribe(channel)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._subscriber_up():  # else kept dirty: the connect subscribes every wanted channel
            self._write(self._book.flush())

    def _count_batches(self, commands: Sequence[SubscriptionCommand]) -> None:
        subscribes = sum(b"UNSUB" not in verb for verb, _ in commands)  # SSUBSCRIBE too
        self.subscribe_batches += subscribes
        self.unsubscribe_batches += len(commands) - subscribes
