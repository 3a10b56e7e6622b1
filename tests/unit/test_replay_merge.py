"""ReplayMerge in isolation: replayed history + held live events -> each id once, in order."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from sse_gateway.wire.ids import (
    HistoryEvent,
    ReplayMerge,
    format_stream_id,
    parse_stream_id,
)

StreamId = tuple[int, int]
Held = list[tuple[str | None, bytes]]


def frame_of(event_id: str) -> bytes:
    return f"frame {event_id}\n\n".encode()


class Scenario:
    def __init__(
        self,
        ids: list[StreamId],
        last: StreamId | None,
        replayed: list[HistoryEvent],
        held: Held,
    ) -> None:
        self.ids = ids
        self.last = last
        self.replayed = replayed
        self.held = held

    def __repr__(self) -> str:
        return (
            f"Scenario(last={self.last}, replayed={[e.id for e in self.replayed]}, "
            f"held={[i for i, _ in self.held]})"
        )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    # Milliseconds 0..60 so that ids like "9-0" and "10-0" meet: a string comparison fails.
    ids = sorted(
        draw(
            st.lists(
                st.tuples(st.integers(0, 60), st.integers(0, 12)),
                unique=True,
                max_size=40,
            )
        )
    )
    # Index of the client's (or channel's) last id; -1: none yet (a refill of a new channel).
    k = draw(st.integers(-1, len(ids) - 1))
    last = ids[k] if k >= 0 else None
    after = ids[k + 1 :]
    # The history read returned after[:h] (it was read at some instant; later ones came live);
    # a refill reads from the last id inclusive, so the read may start with `last` itself.
    h = draw(st.integers(0, len(after)))
    history = after[:h]
    if last is not None and draw(st.booleans()):
        history = [last, *history]
    # Live delivery began (subscription active) before the history read: anywhere up to h.
    s = draw(st.integers(0, h))
    live = after[s:]
    # Pub/Sub may hand over an event twice (resubscription, refill) and may start with events
    # the client already had (older than `last`).
    stale = ids[max(0, k - draw(st.integers(0, 3))) : k + 1] if k >= 0 else []
    held: Held = [(format_stream_id(i), frame_of(format_stream_id(i))) for i in stale]
    for stream_id in live:
        text = format_stream_id(stream_id)
        held.append((text, frame_of(text)))
        if draw(st.integers(0, 4)) == 0:
            held.append((text, frame_of(text)))
    # Events without a history id: plain PUBLISH with no id, or with a custom id.
    extras = draw(st.lists(st.sampled_from([None, "custom:1", "abc", "17", "1-2-3"]), max_size=6))
    for n, extra_id in enumerate(extras):
        position = draw(st.integers(0, len(held)))
        held.insert(position, (extra_id, f"extra {n}\n\n".encode()))
    replayed = [HistoryEvent(format_stream_id(i), frame_of(format_stream_id(i))) for i in history]
    return Scenario(ids, last, replayed, held)


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_merge_sends_every_later_id_once_in_order(scenario: Scenario) -> None:
    replayed_before = copy.deepcopy(scenario.replayed)
    held_before = list(scenario.held)
    merge = ReplayMerge(scenario.last)
    out = merge.merge(scenario.replayed, scenario.held)

    # inputs untouched
    assert scenario.replayed == replayed_before
    assert scenario.held == held_before

    stream_out = [(i, f) for i, f in out if i is not None and parse_stream_id(i) is not None]
    parsed = [parse_stream_id(i) for i, _ in stream_out]
    expected = [i for i in scenario.ids if scenario.last is None or i > scenario.last]
    # strictly increasing (so each once), covering everything after `last`, nothing older
    assert parsed == expected, scenario
    # each id carries its own frame
    assert all(f == frame_of(i) for i, f in stream_out)

    # events without a history id: all present, in the order they arrived, none invented
    extras_in = [(i, f) for i, f in scenario.held if i is None or parse_stream_id(i) is None]
    extras_out = [(i, f) for i, f in out if i is None or parse_stream_id(i) is None]
    assert extras_out == extras_in
    assert len(out) == len(expected) + len(extras_in)

    # arrival order kept: history first, then the held live events as they came
    arrivals = iter([(e.id, e.frame) for e in scenario.replayed] + scenario.held)
    assert all(pair in arrivals for pair in out), "output is not a subsequence of the input"

    # `last` ends at the newest id sent, ready for the next live event
    assert merge.last == (expected[-1] if expected else scenario.last)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_live_events_after_merge_are_admitted_once(scenario: Scenario) -> None:
    merge = ReplayMerge(scenario.last)
    merge.merge(scenario.replayed, scenario.held)
    newest = max(scenario.ids) if scenario.ids else (0, 0)
    following = format_stream_id((newest[0] + 1, 0))
    assert merge.admit(following)
    assert not merge.admit(following)  # a duplicate of the live event
    if scenario.ids:
        assert not merge.admit(format_stream_id(newest))  # already sent
    assert merge.admit(None)
    assert merge.admit("custom:id")


def test_numeric_not_lexicographic_order() -> None:
    merge = ReplayMerge(parse_stream_id("9-5"))
    out = merge.merge(
        [HistoryEvent("9-6", b"a"), HistoryEvent("10-0", b"b"), HistoryEvent("100-0", b"c")],
        [("10-0", b"b"), ("9-7", b"late"), ("100-0", b"c"), ("101-0", b"d")],
    )
    assert [i for i, _ in out] == ["9-6", "10-0", "100-0", "101-0"]


def test_parse_stream_id() -> None:
    assert parse_stream_id("1795839742439-0") == (1795839742439, 0)
    assert parse_stream_id("0-1") == (0, 1)
    for other in (None, "", "17", "1-2-3", "a-1", "1-", "-1", "custom:1", " 1-0"):
        assert parse_stream_id(other) is None, other
    assert format_stream_id((17, 3)) == "17-3"
