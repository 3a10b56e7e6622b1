"""HistoryReader: history reads of one loop tick go to the broker as one batch.

A reconnect storm (thousands of clients with Last-Event-ID at once) or a resubscription after a
broker outage asks for thousands of histories in the same instant; batching them turns that
into a few pipelines of at most 1,000 XRANGEs each, on the broker's small connection pool,
instead of one command and one connection per client.
"""

from __future__ import annotations

import asyncio
import logging

from sse_gateway.broker.base import Broker, HistoryEntry

log = logging.getLogger("sse_gateway.replay")

BATCH = 1000


class HistoryReader:
    def __init__(self, broker: Broker, history_size: int) -> None:
        self._broker = broker
        # The entry at the start id itself, up to history_size after it, and one more: a read
        # that returns `limit` entries was cut short.
        self.limit = history_size + 2
        self._pending: list[tuple[bytes, str, asyncio.Future[list[HistoryEntry]]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def read(self, channel: bytes, start_id: str) -> asyncio.Future[list[HistoryEntry]]:
        """Entries of `channel` with id >= start_id (at most `limit`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[HistoryEntry]] = loop.create_future()
        self._pending.append((channel, start_id, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), BATCH):
            task = asyncio.get_running_loop().create_task(self._run(pending[start : start + BATCH]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self, batch: list[tuple[bytes, str, asyncio.Future[list[HistoryEntry]]]]
    ) -> None:
        try:
            results = await self._broker.read_history(
                [(channel, start) for channel, start, _ in batch], self.limit
            )
        except Exception as exc:
            log.warning("history read of %d channels failed: %s", len(batch), exc)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), entries in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(entries)
