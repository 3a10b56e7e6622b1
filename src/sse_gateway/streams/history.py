"""Reading players' histories: batched reads, coverage checks, decoding entries into frames.

A reconnect storm (thousands of clients with Last-Event-ID at once) or a resubscription after a
broker outage asks for thousands of histories in the same instant; `HistoryReader` turns the
reads of one loop tick into a few pipelines of at most 1,000 XRANGEs each, on the broker's
small connection pool, instead of one command and one connection per client.

The source of truth is the broker's history (a Redis stream per player, `publish.lua` writes
it): entry ids are the events' SSE ids and grow strictly per player.
"""

from __future__ import annotations

import asyncio
import logging

from sse_gateway.broker.base import Broker, HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.wire.envelope import EnvelopeError, envelope_from_object, load_json
from sse_gateway.wire.ids import HistoryEvent, StreamId, parse_stream_id

log = logging.getLogger("sse_gateway.replay")
gateway_log = logging.getLogger("sse_gateway")

BATCH = 1000

_Pending = tuple[bytes, str, "asyncio.Future[list[HistoryEntry]]"]


class HistoryReader:
    """Batched history reads, plus what a read proves about the events in between."""

    def __init__(self, broker: Broker, history_size: int, metrics: Metrics) -> None:
        self._broker = broker
        self._metrics = metrics
        self.history_size = history_size
        # The entry at the start id itself, up to history_size after it, and one more: a read
        # that returns `limit` entries was cut short.
        self.limit = history_size + 2
        self._pending: list[_Pending] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def read(self, channel: bytes, start_id: str) -> asyncio.Future[list[HistoryEntry]]:
        """Entries of `channel` with id >= `start_id`, oldest first, at most `limit`.

        The future fails with the broker's exception (e.g. BrokerUnavailable) when the read
        does; it is sent with the other reads of this loop tick.
        """
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

    async def _run(self, batch: list[_Pending]) -> None:
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

    # --- what a read proves ------------------------------------------------------------------

    def replay_covers(self, last: StreamId, entries: list[HistoryEntry]) -> bool:
        """A client's replay: the history must still hold its last id, and all that follows."""
        if len(entries) >= self.limit:
            return False  # the read was cut short: there is more than a replay may send
        return bool(entries) and parse_stream_id(entries[0].id) == last

    def refill_covers(self, last: StreamId | None, entries: list[HistoryEntry]) -> bool:
        """A channel's refill after an outage: is every event since `last` among `entries`?

        Unlike a client's replay, `last` may legitimately be absent: a Redis restart without
        persistence starts the stream afresh (all it holds came after the outage), and a plain
        PUBLISH never was in the history. Only a stream trimmed past `last` (it holds one more
        entry than the history size only once trimming began) proves events are lost.
        """
        # The read may begin before `last` (it started at an older gap, and a refill that
        # finished meanwhile delivered up to `last`): from `last` on it must be whole.
        if last is not None and any(parse_stream_id(entry.id) == last for entry in entries):
            return len(entries) < self.limit
        # `last` is not there (or the channel delivered nothing yet): only a stream that is
        # full may have been trimmed past the gap's start.
        return len(entries) <= self.history_size

    def events(self, channel: bytes, entries: list[HistoryEntry]) -> list[HistoryEvent]:
        """The frames of history entries. An entry that cannot become a frame is skipped with
        a warning and `sse_invalid_messages_total{reason}`, as on the live path (`unencodable`
        for one that parses but cannot be encoded, e.g. data nested 1,000 deep); the others
        are all returned. Never raises for an entry's content."""
        events = []
        for entry in entries:
            try:
                envelope = envelope_from_object(
                    {"type": entry.type, "data": load_json(entry.data.encode()), "id": entry.id}
                )
                events.append(HistoryEvent(entry.id, envelope.encode()))
                continue
            except EnvelopeError as exc:
                reason = exc.reason
            except Exception:  # RecursionError and the like: whatever a publisher stored
                reason = "unencodable"
            self._metrics.invalid_messages[reason] += 1
            gateway_log.warning(
                "invalid history entry skipped: channel=%s id=%s reason=%s",
                channel.decode("utf-8", "replace"),
                entry.id,
                reason,
            )
        return events
