"""HistoryReader: where a stream starts (`head`: the newest entry id of the player's history,
or a position just before the broker's clock when it is empty), what a read proves
(`replay_covers`), and the frames of entries."""

from __future__ import annotations

import asyncio

import pytest
from fakes import http_chunk, run_in_loop, settle

from sse_gateway.broker.base import BrokerUnavailable, HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.streams.history import BATCH, START, HistoryReader
from sse_gateway.wire.ids import is_position, parse_stream_id, position_id

SIZE = 5
TTL_MS = 60_000
NOW_MS = 1_700_000_000_000
CH = b"SSE::b1::p1"
U64_MAX = 2**64 - 1


class Clock:
    """A broker as far as `HistoryReader` asks it the time."""

    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def redis_time_ms(self) -> int:
        return self.now_ms


class HeadsBroker(Clock):
    """A broker whose histories end where `heads` says (a channel not in it is empty); it
    records every `read_heads` call, answers on a later loop turn, and fails with `error`."""

    def __init__(self, heads: dict[bytes, str] | None = None, now_ms: int = NOW_MS) -> None:
        super().__init__(now_ms)
        self.heads = heads or {}
        self.calls: list[list[bytes]] = []
        self.history_calls: list[list[tuple[bytes, str]]] = []
        self.error: Exception | None = None

    async def read_heads(self, channels: list[bytes]) -> tuple[list[str | None], int]:
        self.calls.append(list(channels))
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return [self.heads.get(channel) for channel in channels], self.now_ms

    async def read_history(
        self, requests: list[tuple[bytes, str]], limit: int
    ) -> list[list[HistoryEntry]]:
        self.history_calls.append(list(requests))
        return [[] for _ in requests]


def entries(first: int, last: int, ms: int = NOW_MS) -> list[HistoryEntry]:
    """Entries `<ms>-<n>` for n in first..last."""
    return [HistoryEntry(f"{ms}-{n}", "n", str(n)) for n in range(first, last + 1)]


def reader(broker: object = None) -> HistoryReader:
    broker = broker if broker is not None else Clock()
    return HistoryReader(broker, SIZE, Metrics(), TTL_MS / 1000)  # type: ignore[arg-type]


# --- positions -------------------------------------------------------------------------------


def test_a_position_is_the_end_of_a_millisecond_and_no_entry() -> None:
    assert START == "0-0"
    assert position_id(1234) == f"1234-{U64_MAX}"
    position = parse_stream_id(position_id(1234))
    assert position == (1234, U64_MAX)
    assert is_position(position)
    assert not is_position((1234, 0))
    assert not is_position((0, 0))
    assert (1234, 7) < position < (1235, 0)  # after every entry of its millisecond


# --- head: where a history ends ---------------------------------------------------------------

HeadCall = tuple[str | None, BaseException | None]


class Heads:
    """Asks `HistoryReader.head` for channels and records each callback's calls."""

    def __init__(self, history: HistoryReader) -> None:
        self.history = history
        self.calls: dict[int, list[HeadCall]] = {}

    def ask(self, channel: bytes) -> int:
        n = len(self.calls)
        self.calls[n] = []
        self.history.head(channel, lambda head, exc: self.calls[n].append((head, exc)))
        return n

    async def answered(self, *asked: int) -> list[HeadCall]:
        """The one call each callback got (after a few loop turns)."""
        await settle(5)
        for n in asked:
            assert len(self.calls[n]) == 1, (n, self.calls[n])  # exactly once
        return [self.calls[n][0] for n in asked]


@run_in_loop
async def test_the_head_of_a_history_is_its_newest_entry_id() -> None:
    broker = HeadsBroker({CH: f"{NOW_MS - 5}-3"})
    heads = Heads(reader(broker))
    asked = heads.ask(CH)
    assert heads.calls[asked] == [] and broker.calls == []  # read on a later turn
    assert await heads.answered(asked) == [(f"{NOW_MS - 5}-3", None)]
    assert broker.calls == [[CH]]


@run_in_loop
async def test_the_head_of_an_empty_history_is_a_position_just_before_the_brokers_clock() -> None:
    # Every entry added after the read has an id of the broker's clock at the read or later:
    # above the end of the millisecond before it.
    broker = HeadsBroker(now_ms=NOW_MS)
    heads = Heads(reader(broker))
    [(head, exc)] = await heads.answered(heads.ask(CH))
    assert (head, exc) == (position_id(NOW_MS - 1), None)
    parsed = parse_stream_id(head)
    assert parsed is not None and is_position(parsed) and parsed < (NOW_MS, 0)
    broker.now_ms = 0  # a clock at its very start: no negative millisecond
    assert await heads.answered(heads.ask(CH)) == [(position_id(0), None)]


@run_in_loop
async def test_heads_asked_in_one_turn_are_read_together_in_batches() -> None:
    channels = [f"SSE::b1::p{n}".encode() for n in range(2 * BATCH + 5)]
    ends = {channel: f"{n + 1}-0" for n, channel in enumerate(channels) if n % 2}
    broker = HeadsBroker(ends)
    history = reader(broker)
    heads = Heads(history)
    asked = [heads.ask(channel) for channel in channels]
    results = await heads.answered(*asked)
    assert [len(call) for call in broker.calls] == [BATCH, BATCH, 5]
    assert [channel for call in broker.calls for channel in call] == channels
    empty = position_id(NOW_MS - 1)
    assert results == [(ends.get(channel, empty), None) for channel in channels]
    # A head asked on a later turn is a read of its own.
    assert await heads.answered(heads.ask(channels[1])) == [("2-0", None)]
    assert broker.calls[-1] == [channels[1]]
    # History reads of the same turn go to read_history, heads to read_heads.
    other = b"SSE::b2::p0"
    read = history.read(other, START)
    asked_head = heads.ask(other)
    assert await read == []
    assert await heads.answered(asked_head) == [(empty, None)]
    assert broker.history_calls == [[(other, START)]] and broker.calls[-1] == [other]


@run_in_loop
async def test_a_failed_head_read_fails_every_head_of_its_batch() -> None:
    broker = HeadsBroker({CH: "5-0"})
    broker.error = BrokerUnavailable("redis unavailable: down")
    heads = Heads(reader(broker))
    results = await heads.answered(heads.ask(CH), heads.ask(b"SSE::b1::p2"))
    assert results == [(None, broker.error), (None, broker.error)]
    broker.error = None  # the next read is a new attempt
    assert await heads.answered(heads.ask(CH)) == [("5-0", None)]


@run_in_loop
async def test_a_head_callback_that_raises_does_not_keep_the_others_waiting() -> None:
    broker = HeadsBroker({CH: "5-0"})
    history = reader(broker)
    heads = Heads(history)

    def broken(head: str | None, exc: BaseException | None) -> None:
        raise RuntimeError("a stream's bug")

    first = heads.ask(CH)
    history.head(CH, broken)
    last = heads.ask(CH)
    assert await heads.answered(first, last) == [("5-0", None), ("5-0", None)]


# --- replay_covers ---------------------------------------------------------------------------

POSITION = (NOW_MS - 1000, U64_MAX)


@pytest.mark.parametrize(
    ("count", "covered"),
    [
        (0, True),  # still empty: nothing to replay, nothing missed
        (1, True),
        (SIZE - 1, True),  # below the history size
        (SIZE, True),  # at it: publish.lua has not trimmed yet
        (SIZE + 1, False),  # above it: trimming began, the oldest events may be gone
        (SIZE + 2, False),  # a read cut short at `limit`
    ],
)
def test_a_replay_from_a_position_is_covered_while_the_history_is_not_full(
    count: int, covered: bool
) -> None:
    assert reader().replay_covers(POSITION, entries(1, count)) is covered


@pytest.mark.parametrize(
    ("first_ms", "covered"),
    [
        (POSITION[0] + 1, True),
        (POSITION[0] + TTL_MS - 1, True),
        (POSITION[0] + TTL_MS, False),  # a history expired before its first entry came
        (POSITION[0] + 10 * TTL_MS, False),
    ],
)
def test_a_replay_from_a_position_is_not_covered_once_the_history_may_have_expired(
    first_ms: int, covered: bool
) -> None:
    assert reader().replay_covers(POSITION, entries(0, 1, first_ms)) is covered


@pytest.mark.parametrize(
    ("now_ms", "covered"),
    [(POSITION[0] + TTL_MS - 1, True), (POSITION[0] + TTL_MS, False)],
)
def test_an_empty_read_from_an_old_position_is_not_covered(now_ms: int, covered: bool) -> None:
    # Nothing in the history now: if the position is older than the TTL, events published
    # after it may have expired unsent.
    assert reader(Clock(now_ms)).replay_covers(POSITION, []) is covered


def test_a_position_later_than_now_is_not_covered() -> None:
    # No stream was given it: recovered, it would hide the events published until then.
    assert reader(Clock(NOW_MS)).replay_covers((NOW_MS + 1, U64_MAX), []) is False
    assert reader(Clock(NOW_MS)).replay_covers((NOW_MS, U64_MAX), []) is True


def test_a_replay_from_an_id_needs_that_id_first_and_an_uncut_read() -> None:
    history = reader()
    last = (NOW_MS, 3)
    assert history.replay_covers(last, entries(3, 7))
    assert history.replay_covers(last, entries(3, 3))  # only the id itself: nothing missed
    assert not history.replay_covers(last, entries(4, 7))  # trimmed past it
    assert not history.replay_covers(last, [])  # gone (expired, restarted)
    assert not history.replay_covers(last, entries(3, 3 + history.limit - 1))  # cut short
    assert history.replay_covers(last, entries(3, 3 + history.limit - 2))
    assert not history.replay_covers((0, 0), entries(1, 3))  # 0-0 is no entry: unknown


# --- events are chunks -----------------------------------------------------------------------


def test_history_events_are_chunks_of_their_frames() -> None:
    history = reader()
    [event] = history.events(CH, [HistoryEntry("5-1", "note", '{"a":1}')])
    assert event.id == "5-1"
    assert event.frame == http_chunk(b'id: 5-1\nevent: note\ndata: {"a":1}\n\n')
