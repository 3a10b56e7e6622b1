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
from collections.abc import Callable

from sse_gateway.broker.base import Broker, HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.wire.envelope import EnvelopeError, envelope_from_object, load_json
from sse_gateway.wire.frames import chunk
from sse_gateway.wire.ids import (
    HistoryEvent,
    StreamId,
    is_position,
    parse_stream_id,
    position_id,
)

log = logging.getLogger("sse_gateway.replay")
gateway_log = logging.getLogger("sse_gateway")

BATCH = 1000

_Pending = tuple[bytes, str, "asyncio.Future[list[HistoryEntry]]"]
# Called once with where a history ends, or with the exception that kept it from being read.
HeadCallback = Callable[[str | None, BaseException | None], None]
_PendingHead = tuple[bytes, HeadCallback]

# How long the head reads of arriving streams are gathered before they are sent together.
HEAD_BATCH_SECONDS = 0.002
# The start of every history: a read from it returns every entry.
START = "0-0"


class HistoryReader:
    """Batched history reads, plus what a read proves about the events in between."""

    def __init__(
        self, broker: Broker, history_size: int, metrics: Metrics, history_ttl: float = 86_400.0
    ) -> None:
        """`history_size` and `history_ttl` (seconds) are what publishers keep (SSE_HISTORY_SIZE,
        SSE_HISTORY_TTL): what a read proves depends on them."""
        self._broker = broker
        self.history_ttl_ms = int(history_ttl * 1000)
        self._metrics = metrics
        self.history_size = history_size
        # The entry at the start id itself, up to history_size after it, and one more: a read
        # that returns `limit` entries was cut short.
        self.limit = history_size + 2
        self._pending: list[_Pending] = []
        self._pending_heads: list[_PendingHead] = []
        self._heads_scheduled = False
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

    def head(self, channel: bytes, callback: HeadCallback) -> None:
        """Where `channel`'s history ends: `callback(id, None)` with the id of its newest
        entry, or, when it is empty, a `position_id` just before the broker's clock at the read
        (every entry added later has a larger id); `callback(None, exc)` when the read fails.
        Batched like `read`. (A callback, not a future: this is on every stream's way in.)"""
        self._pending_heads.append((channel, callback))
        if not self._heads_scheduled:
            # Streams arrive a few per loop turn: waiting a moment gathers them into one
            # pipeline, whose fixed cost (a task, a timeout, two syscalls, a wake-up) would
            # otherwise be paid per stream or two.
            self._heads_scheduled = True
            asyncio.get_running_loop().call_later(HEAD_BATCH_SECONDS, self._flush_heads)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(pending), BATCH):
            self._spawn(loop.create_task(self._run(pending[start : start + BATCH])))

    def _flush_heads(self) -> None:
        self._heads_scheduled = False
        heads, self._pending_heads = self._pending_heads, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(heads), BATCH):
            self._spawn(loop.create_task(self._run_heads(heads[start : start + BATCH])))

    def _spawn(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_heads(self, batch: list[_PendingHead]) -> None:
        try:
            heads, now_ms = await self._broker.read_heads([channel for channel, _ in batch])
            empty = position_id(max(0, now_ms - 1))
        except Exception as exc:
            log.warning("history head read of %d channels failed: %s", len(batch), exc)
            for _, callback in batch:
                self._call(callback, None, exc)
            return
        for (_, callback), head in zip(batch, heads, strict=True):
            self._call(callback, empty if head is None else head, None)

    @staticmethod
    def _call(callback: HeadCallback, head: str | None, exc: BaseException | None) -> None:
        try:
            callback(head, exc)
        except Exception:  # one stream's failure must not keep the batch's others waiting
            log.exception("history head callback failed")

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
        """A client's replay: the history must still hold its last id, and all that follows.

        A `position_id` (the resume id of a stream that began on an empty history) is in no
        history: the read holds every entry after it. Nothing after it was trimmed as long as
        the stream is not full (publish.lua keeps history_size + 1 entries once it trims), and
        nothing expired as long as the first entry after it (or now, when there is none) comes
        less than the history TTL after it: the history expires only a TTL after its last
        publish, and everything published before the expiry goes with it.
        """
        if is_position(last):
            now_ms = self._broker.redis_time_ms()
            if len(entries) > self.history_size or last[0] > now_ms:
                return False  # trimmed, or a position no stream was given (it would hide events)
            first = parse_stream_id(entries[0].id) if entries else None
            first_ms = first[0] if first is not None else now_ms
            return first_ms < last[0] + self.history_ttl_ms
        if len(entries) >= self.limit:
            return False  # the read was cut short: there is more than a replay may send
        return bool(entries) and parse_stream_id(entries[0].id) == last

    def refill_verdict(self, last: StreamId | None, entries: list[HistoryEntry]) -> str:
        """What a channel's refill read after an outage proves about the gap.

        `last` is the newest history id the channel delivered (None: none yet); `entries`
        were read from the gap's start. `covered`: every event after `last` is in `entries`.
        `gap`: the history was trimmed past `last` (it holds one more entry than the history
        size only once trimming began), events are provably lost. `lost`: the history no
        longer holds `last` but was not trimmed: Redis restarted (empty, or from an older
        snapshot), the key expired, or entries were deleted; what lies below `last` decides
        (`OutageRecovery`).
        """
        if last is None:
            # The channel sent nothing from history yet: a plain PUBLISH never was in it, and
            # a stream that is not full was not trimmed past the gap's start.
            return "covered" if len(entries) <= self.history_size else "gap"
        # The read may begin before `last` (it started at an older gap, and a refill that
        # finished meanwhile delivered up to `last`): from `last` on it must be whole.
        if any(parse_stream_id(entry.id) == last for entry in entries):
            return "covered" if len(entries) < self.limit else "gap"
        return "gap" if len(entries) > self.history_size else "lost"

    def events(self, channel: bytes, entries: list[HistoryEntry]) -> list[HistoryEvent]:
        """The frames (as chunks, see `streams.stream`) of history entries. An entry that
        cannot become a frame is skipped with a warning and `sse_invalid_messages_total{reason}`,
        as on the live path (`unencodable` for one that parses but cannot be encoded, e.g.
        data nested 1,000 deep); the others are all returned.
        Never raises for an entry's content."""
        events = []
        for entry in entries:
            try:
                envelope = envelope_from_object(
                    {"type": entry.type, "data": load_json(entry.data.encode()), "id": entry.id}
                )
                events.append(HistoryEvent(entry.id, chunk(envelope.encode())))
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
