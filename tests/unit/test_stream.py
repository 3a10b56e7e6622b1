"""Stream and its state machine, on a fake transport with a recording owner (no loop needed)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest
from fakes import FakeOwner, FakeTransport
from sse_spec_parser import parse_sse

from sse_gateway.streams.stream import (
    RETRY_SPREAD_MS,
    IllegalTransition,
    Stream,
    StreamState,
    closing_retry,
)
from sse_gateway.wire.frames import encode_comment, encode_event, encode_retry
from sse_gateway.wire.http import stream_head
from sse_gateway.wire.ids import HistoryEvent, parse_stream_id

HEAD = stream_head([("X-Test", "1")])
CONNECTED = encode_event("connected", '{"ok":true}')
HEARTBEAT = encode_comment("hb")


def frame(event_id: str | None, data: str | None = None) -> bytes:
    return encode_event("e", data if data is not None else str(event_id), event_id)


def make(owner: FakeOwner | None = None) -> tuple[Stream, FakeTransport, FakeOwner]:
    transport = FakeTransport()
    owner = owner if owner is not None else FakeOwner()
    stream = Stream(transport, b"ch", 7, HEAD, owner)  # type: ignore[arg-type]
    return stream, transport, owner


def live(owner: FakeOwner | None = None) -> tuple[Stream, FakeTransport, FakeOwner]:
    stream, transport, owner = make(owner)
    stream.go_live(CONNECTED, [], None)
    transport.writes.clear()
    return stream, transport, owner


def deliver(stream: Stream, event_id: str | None, data: str | None = None) -> int:
    return stream.deliver(frame(event_id, data), event_id, parse_stream_id(event_id))


def body_of(output: bytes) -> bytes:
    """The SSE part of what was written (after the HTTP head)."""
    assert output.startswith(HEAD)
    return output[len(HEAD) :]


# --- the state machine ----------------------------------------------------------------------

S = StreamState


def _in_state(state: StreamState) -> tuple[Stream, FakeTransport, FakeOwner]:
    stream, transport, owner = make()
    if state is S.REPLAYING:
        stream.begin_replay()
    elif state is S.LIVE:
        stream.go_live(CONNECTED, [], None)
    elif state is S.CLOSED:
        stream.close("test")
    assert stream.state is state
    return stream, transport, owner


TRANSITIONS: dict[str, Callable[[Stream], object]] = {
    "begin_replay": lambda s: s.begin_replay(),
    "go_live": lambda s: s.go_live(CONNECTED, [], None),
    "close": lambda s: s.close("test"),
}

# (state, transition) -> the state after it, or None: IllegalTransition.
TABLE: dict[tuple[StreamState, str], StreamState | None] = {
    (S.JOINING, "begin_replay"): S.REPLAYING,
    (S.JOINING, "go_live"): S.LIVE,
    (S.JOINING, "close"): S.CLOSED,
    (S.REPLAYING, "begin_replay"): None,
    (S.REPLAYING, "go_live"): S.LIVE,
    (S.REPLAYING, "close"): S.CLOSED,
    (S.LIVE, "begin_replay"): None,
    (S.LIVE, "go_live"): None,
    (S.LIVE, "close"): S.CLOSED,
    (S.CLOSED, "begin_replay"): None,
    (S.CLOSED, "go_live"): None,
    (S.CLOSED, "close"): S.CLOSED,
}


CASES = [(state, name) for state in StreamState for name in TRANSITIONS]


def test_table_covers_every_state_and_transition() -> None:
    assert set(TABLE) == set(CASES)
    assert len(CASES) == 12


@pytest.mark.parametrize(("state", "transition"), CASES)
def test_transition(state: StreamState, transition: str) -> None:
    stream, transport, owner = _in_state(state)
    writes, closes = list(transport.writes), len(owner.closed)
    expected = TABLE[state, transition]
    if expected is None:
        with pytest.raises(IllegalTransition, match=transition):
            TRANSITIONS[transition](stream)
        assert stream.state is state  # unchanged
        assert transport.writes == writes  # nothing written
        assert len(owner.closed) == closes
    else:
        TRANSITIONS[transition](stream)
        assert stream.state is expected
        reported = 1 if expected is S.CLOSED and state is not S.CLOSED else 0
        assert len(owner.closed) == closes + reported


def test_close_twice_reports_once_and_closes_the_socket_once() -> None:
    stream, transport, owner = live()
    stream.close("shutdown", final=b"retry: 1\n\n")
    stream.close("other", final=b"retry: 2\n\n")
    stream.close("third", abort=True)
    assert owner.closed == [(stream, "shutdown")]
    assert transport.writes == [b"retry: 1\n\n"]
    assert transport.closed
    assert not transport.aborted
    assert stream.state is S.CLOSED


# --- the head -------------------------------------------------------------------------------


def test_go_live_writes_head_connected_and_events_in_one_write() -> None:
    stream, transport, _ = make()
    stream.begin_replay()
    assert transport.writes == []
    written = stream.go_live(CONNECTED, [HistoryEvent("1-1", frame("1-1"))], None)
    assert written == 1
    assert transport.writes == [HEAD + CONNECTED + frame("1-1")]


def test_go_live_from_joining_writes_head_and_connected() -> None:
    stream, transport, _ = make()
    assert stream.go_live(CONNECTED, [], None) == 0
    assert transport.writes == [HEAD + CONNECTED]
    assert stream.floor is None


def test_head_is_written_once() -> None:
    stream, transport, _ = make()
    stream.go_live(CONNECTED, [], None)
    deliver(stream, "1-1")
    stream.heartbeat(HEARTBEAT)
    stream.close("shutdown", final=b"retry: 5\n\n")
    assert transport.output.count(HEAD) == 1
    assert transport.output.startswith(HEAD)
    assert transport.writes[1:] == [frame("1-1"), HEARTBEAT, b"retry: 5\n\n"]


@pytest.mark.parametrize("replaying", [False, True])
def test_close_before_go_live_writes_head_and_final(replaying: bool) -> None:
    stream, transport, owner = make()
    if replaying:
        stream.begin_replay()
    final = closing_retry(3000)
    stream.close("broker_unavailable", final=final)
    assert transport.writes == [HEAD + final]
    assert transport.closed and not transport.aborted
    assert owner.closed == [(stream, "broker_unavailable")]
    parsed = parse_sse(body_of(transport.output))
    assert parsed.events == []
    assert parsed.retry is not None and parsed.retry >= 3000


def test_abort_writes_nothing() -> None:
    stream, transport, owner = make()
    stream.close("slow_consumer", abort=True, final=b"retry: 1\n\n")
    assert transport.writes == []
    assert transport.aborted and not transport.closed
    assert owner.closed == [(stream, "slow_consumer")]


# --- deliver in each state ------------------------------------------------------------------


def test_deliver_while_joining_is_ignored() -> None:
    stream, transport, _ = make()
    assert deliver(stream, "1-1") == 0
    assert stream.go_live(CONNECTED, [], None) == 0
    assert transport.writes == [HEAD + CONNECTED]  # the event was not for this stream yet


def test_deliver_while_replaying_is_held_in_order() -> None:
    stream, transport, _ = make()
    stream.begin_replay()
    assert deliver(stream, "1-2") == 0
    assert deliver(stream, None, "plain") == 0
    assert deliver(stream, "1-3") == 0
    assert transport.writes == []
    assert stream.held is not None
    assert [(h.id, h.frame) for h in stream.held] == [
        ("1-2", frame("1-2")),
        (None, frame(None, "plain")),
        ("1-3", frame("1-3")),
    ]
    assert stream.go_live(CONNECTED, [], None) == 3
    assert transport.writes == [
        HEAD + CONNECTED + frame("1-2") + frame(None, "plain") + frame("1-3")
    ]
    assert stream.held is None


def test_deliver_while_live_is_written() -> None:
    stream, transport, _ = live()
    assert deliver(stream, "1-1") == 1
    assert deliver(stream, None, "plain") == 1
    assert transport.writes == [frame("1-1"), frame(None, "plain")]


def test_deliver_after_close_is_ignored() -> None:
    stream, transport, _ = live()
    stream.close("shutdown")
    assert deliver(stream, "1-1") == 0
    assert transport.writes == []
    assert transport.late_writes == []


# --- the replay merge -----------------------------------------------------------------------


def test_go_live_merges_replay_with_held_live_events() -> None:
    stream, transport, _ = make()
    stream.begin_replay()
    # Live copies that overlap the replay, a plain PUBLISH, a custom id, one newer event.
    for event_id in ("1-2", "1-3", None, "custom", "1-4", "1-3"):
        deliver(stream, event_id, f"live {event_id}")
    replayed = [HistoryEvent(i, frame(i, f"history {i}")) for i in ("1-1", "1-2", "1-3")]
    written = stream.go_live(CONNECTED, replayed, parse_stream_id("1-0"))
    [data] = transport.writes
    events = parse_sse(body_of(data)).events
    assert [(e.type, e.data) for e in events] == [
        ("connected", '{"ok":true}'),
        ("e", "history 1-1"),
        ("e", "history 1-2"),
        ("e", "history 1-3"),
        ("e", "live None"),
        ("e", "live custom"),
        ("e", "live 1-4"),
    ]
    assert written == 6
    # Each id once, stream ids ascending (the SSE parser's `id` persists, so read the lines).
    assert re.findall(rb"^id: (.*)$", data, re.MULTILINE) == [
        b"1-1",
        b"1-2",
        b"1-3",
        b"custom",
        b"1-4",
    ]
    assert stream.floor == (1, 4)


def test_replayed_events_at_or_below_the_last_id_are_skipped() -> None:
    stream, transport, _ = make()
    stream.begin_replay()
    replayed = [HistoryEvent(i, frame(i)) for i in ("1-1", "1-2", "1-3")]
    assert stream.go_live(CONNECTED, replayed, parse_stream_id("1-2")) == 1
    assert transport.writes == [HEAD + CONNECTED + frame("1-3")]


def test_floor_skips_late_live_copies_and_is_cleared_by_a_newer_event() -> None:
    stream, transport, _ = make()
    stream.begin_replay()
    replayed = [HistoryEvent(i, frame(i)) for i in ("1-1", "1-2", "1-3")]
    stream.go_live(CONNECTED, replayed, None)
    transport.writes.clear()
    assert stream.floor == (1, 3)
    assert deliver(stream, "1-2") == 0  # late live copies of replayed events
    assert deliver(stream, "1-3") == 0
    assert deliver(stream, None, "plain") == 1  # no stream id: always passes
    assert deliver(stream, "custom") == 1
    assert stream.floor == (1, 3)  # ... and does not clear the floor
    assert deliver(stream, "1-4") == 1
    assert stream.floor is None
    assert deliver(stream, "1-1") == 1  # past the floor, channel order is trusted
    assert transport.writes == [
        frame(None, "plain"),
        frame("custom"),
        frame("1-4"),
        frame("1-1"),
    ]


def test_floor_after_an_empty_replay_is_the_clients_last_id() -> None:
    stream, transport, _ = make()
    stream.begin_replay()
    assert stream.go_live(CONNECTED, [], parse_stream_id("5-0")) == 0
    assert stream.floor == (5, 0)
    assert deliver(stream, "5-0") == 0
    assert deliver(stream, "5-1") == 1
    assert transport.writes[1:] == [frame("5-1")]


# --- backpressure ---------------------------------------------------------------------------


def test_frames_queue_while_paused_and_flush_in_order() -> None:
    stream, transport, owner = live()
    stream.pause_writing()
    for i in range(1, 4):
        assert deliver(stream, f"1-{i}") == 1
    assert transport.writes == []
    stream.resume_writing()
    assert transport.writes == [frame("1-1"), frame("1-2"), frame("1-3")]
    assert stream.queue is None
    assert deliver(stream, "1-4") == 1
    assert transport.writes[-1] == frame("1-4")
    assert owner.closed == []


def test_resume_stops_flushing_when_the_transport_pauses_again() -> None:
    stream, transport, _ = live()
    stream.pause_writing()
    for i in range(1, 5):
        deliver(stream, f"1-{i}")

    def pause_after_two(data: bytes) -> None:
        if len(transport.writes) == 2:
            stream.pause_writing()

    transport.on_write = pause_after_two
    stream.resume_writing()
    assert transport.writes == [frame("1-1"), frame("1-2")]
    transport.on_write = None
    deliver(stream, "1-5")  # still paused: behind the rest
    stream.resume_writing()
    assert transport.writes == [frame(f"1-{i}") for i in range(1, 6)]


def test_queue_beyond_the_buffer_size_aborts_as_slow_consumer() -> None:
    stream, transport, owner = live(FakeOwner(event_buffer_size=3))
    stream.pause_writing()
    for i in range(3):
        deliver(stream, f"1-{i}")
    assert owner.closed == []
    deliver(stream, "1-3")
    assert owner.closed == [(stream, "slow_consumer")]
    assert stream.state is S.CLOSED
    assert transport.aborted
    assert not transport.closed
    assert transport.writes == []
    stream.resume_writing()
    assert transport.writes == []  # the queue went with the stream
    assert transport.late_writes == []


def test_heartbeats_are_skipped_while_paused() -> None:
    stream, transport, _ = live()
    stream.heartbeat(HEARTBEAT)
    stream.pause_writing()
    stream.heartbeat(HEARTBEAT)
    stream.heartbeat(HEARTBEAT)
    assert transport.writes == [HEARTBEAT]
    stream.resume_writing()
    assert transport.writes == [HEARTBEAT]  # skipped, not queued
    stream.heartbeat(HEARTBEAT)
    assert transport.writes == [HEARTBEAT, HEARTBEAT]


# --- the socket going away ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason"), [(None, "client"), (ConnectionResetError("reset"), "error")]
)
@pytest.mark.parametrize("state", [S.JOINING, S.REPLAYING, S.LIVE])
def test_connection_lost_closes_then_reports_the_socket(
    state: StreamState, exc: Exception | None, reason: str
) -> None:
    stream, transport, owner = _in_state(state)
    writes = list(transport.writes)
    stream.connection_lost(exc)
    assert stream.state is S.CLOSED
    assert owner.calls == [f"stream_closed:{reason}", "socket_closed"]
    assert owner.sockets_closed == [stream]
    assert transport.writes == writes  # nothing written, not even a head
    assert not transport.closed and not transport.aborted
    # Nothing is written afterwards either.
    deliver(stream, "9-9")
    stream.heartbeat(HEARTBEAT)
    stream.close("again", final=b"retry: 1\n\n")
    stream.resume_writing()
    assert transport.writes == writes
    assert owner.calls == [f"stream_closed:{reason}", "socket_closed"]


def test_connection_lost_after_close_reports_the_socket_only() -> None:
    stream, transport, owner = live()
    stream.close("shutdown", final=b"retry: 1\n\n")
    stream.connection_lost(None)
    assert owner.calls == ["stream_closed:shutdown", "socket_closed"]
    assert transport.writes == [b"retry: 1\n\n"]


def test_data_from_the_client_is_ignored() -> None:
    stream, transport, owner = live()
    stream.data_received(b"GET / HTTP/1.1\r\n\r\n")
    assert transport.writes == []
    assert stream.state is S.LIVE
    assert owner.calls == []


# --- closing_retry --------------------------------------------------------------------------


def test_closing_retry_is_within_the_spread() -> None:
    values = set()
    for _ in range(300):
        parsed = parse_sse(closing_retry(2000))
        assert parsed.retry is not None
        assert 2000 <= parsed.retry < 2000 + RETRY_SPREAD_MS
        values.add(parsed.retry)
    assert len(values) > 1  # spread, not one value for every client


@pytest.mark.parametrize("pick", [lambda n: 0, lambda n: n - 1])
def test_closing_retry_edges(monkeypatch: pytest.MonkeyPatch, pick: Callable[[int], int]) -> None:
    monkeypatch.setattr(random, "randrange", pick)  # the module `stream` draws from
    expected = 1500 + pick(RETRY_SPREAD_MS)
    assert closing_retry(1500) == encode_retry(expected)
    assert 1500 <= expected < 1500 + RETRY_SPREAD_MS
    assert random.randrange is pick


def test_a_stream_on_a_socket_already_backed_up_queues_from_the_start() -> None:
    # The transport said pause_writing to the request reader before the hand-over.
    owner = FakeOwner()
    transport = FakeTransport()
    stream = Stream(transport, b"ch", 7, HEAD, owner, paused=True)  # type: ignore[arg-type]
    stream.go_live(CONNECTED, [], None)
    transport.writes.clear()
    for i in range(owner.event_buffer_size):
        assert deliver(stream, f"1-{i}") == 1
    assert transport.writes == []  # queued, not written
    assert stream.state is StreamState.LIVE
    deliver(stream, "2-0")
    assert stream.state is StreamState.CLOSED
    assert transport.aborted
    assert [reason for _, reason in owner.closed] == ["slow_consumer"]
