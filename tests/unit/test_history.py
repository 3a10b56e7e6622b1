"""HistoryReader: where a stream starts (`position`), what a read proves (`replay_covers`), and
the frames of entries."""

from __future__ import annotations

import pytest
from fakes import http_chunk

from sse_gateway.broker.base import HistoryEntry
from sse_gateway.metrics import Metrics
from sse_gateway.streams.history import POSITION_MARGIN_MS, START, HistoryReader
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


def test_a_stream_starts_at_a_position_of_redis_clock_a_margin_back() -> None:
    clock = Clock()
    history = reader(clock)
    assert history.position() == position_id(NOW_MS - POSITION_MARGIN_MS)
    clock.now_ms += 1
    assert history.position() == position_id(NOW_MS + 1 - POSITION_MARGIN_MS)  # not stale
    clock.now_ms = POSITION_MARGIN_MS - 1  # a clock that cannot go a margin back
    assert history.position() == position_id(0)


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
