"""Stream and its state machine, on a fake transport with a recording owner (no loop needed).

Frames reach a stream as HTTP/1.1 chunks (`wire.frames.chunk`, once per message); a `Stream`
writes them as they are and ends its body with the last chunk, a `PlainStream` (HTTP/1.0)
takes each frame back out of its chunk. The expected bytes here are built with the tests' own
`http_chunk`, not with the gateway's.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable

import pytest
from fakes import END_CHUNK, FakeOwner, FakeTransport, dechunk, http_chunk, split_chunks
from sse_spec_parser import parse_sse

from sse_gateway.streams.stream import (
    CLOSE_MESSAGES,
    RETRY_SPREAD_MS,
    IllegalTransition,
    PlainStream,
    Stream,
    StreamState,
    farewell,
    session_expired,
    spread_retry,
)
from sse_gateway.wire.frames import encode_close, encode_comment, encode_event
from sse_gateway.wire.http import stream_head
from sse_gateway.wire.ids import HistoryEvent, parse_stream_id

HEAD = stream_head([("X-Test", "1")])
PLAIN_HEAD = stream_head([("X-Test", "1")], chunked=False)
CONNECTED = encode_event("connected", '{"ok":true}')  # `go_live` takes it plain
HEARTBEAT = http_chunk(encode_comment("hb"))  # heartbeats come as chunks, like events
FINAL = encode_close("shutdown", "bye", 1234)  # `close(final=)` takes it plain


def plain(event_id: str | None, data: str | None = None) -> bytes:
    """An event's frame as an HTTP/1.0 client reads it."""
    return encode_event("e", data if data is not None else str(event_id), event_id)


def frame(event_id: str | None, data: str | None = None) -> bytes:
    """An event's frame as the channel hands it to a stream: one chunk."""
    return http_chunk(plain(event_id, data))


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
    """The SSE part of what was written (after the HTTP head), out of its chunks."""
    assert output.startswith(HEAD)
    return dechunk(output[len(HEAD) :])


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
    stream.close("shutdown", final=FINAL)
    stream.close("other", final=encode_close("other", "again", 1))
    stream.close("third", abort=True)
    assert owner.closed == [(stream, "shutdown")]
    assert transport.writes == [http_chunk(FINAL) + END_CHUNK]
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
    assert transport.writes == [HEAD + http_chunk(CONNECTED) + frame("1-1")]


def test_go_live_from_joining_writes_head_and_connected() -> None:
    stream, transport, _ = make()
    assert stream.go_live(CONNECTED, [], None) == 0
    assert transport.writes == [HEAD + http_chunk(CONNECTED)]
    assert stream.floor is None


def test_head_is_written_once() -> None:
    stream, transport, _ = make()
    stream.go_live(CONNECTED, [], None)
    deliver(stream, "1-1")
    stream.heartbeat(HEARTBEAT)
    stream.close("shutdown", final=FINAL)
    assert transport.output.count(HEAD) == 1
    assert transport.output.startswith(HEAD)
    assert transport.writes[1:] == [frame("1-1"), HEARTBEAT, http_chunk(FINAL) + END_CHUNK]


@pytest.mark.parametrize("replaying", [False, True])
def test_close_before_go_live_writes_head_and_final(replaying: bool) -> None:
    stream, transport, owner = make()
    if replaying:
        stream.begin_replay()
    final = farewell("replay_failed", 3000)
    stream.close("replay_failed", final=final)
    assert transport.writes == [HEAD + http_chunk(final) + END_CHUNK]
    assert transport.closed and not transport.aborted
    assert owner.closed == [(stream, "replay_failed")]
    parsed = parse_sse(body_of(transport.output))
    assert [(e.type, json.loads(e.data)["reason"]) for e in parsed.events] == [
        ("close", "replay_failed")
    ]
    assert parsed.retry is not None and parsed.retry >= 3000


def test_session_expired_is_an_event_of_its_own_with_the_plain_retry_and_no_id() -> None:
    stream, transport, _ = make()
    stream.go_live(CONNECTED, [], None)
    stream.close("session_expired", final=session_expired(2500))
    parsed = parse_sse(body_of(transport.output))
    last = parsed.events[-1]
    assert last.type == "session_expired"
    assert json.loads(last.data) == {
        "reason": "session_expired",
        "message": CLOSE_MESSAGES["session_expired"],
    }
    # No spread: streams expire one by one. No `id:`: the client keeps its last event id.
    assert parsed.retry == 2500
    assert b"id:" not in session_expired(2500)
    assert transport.output.endswith(END_CHUNK)


def test_close_without_final_still_ends_the_chunked_body() -> None:
    stream, transport, _ = live()
    stream.close("test")
    assert transport.writes == [END_CHUNK]
    assert transport.closed and not transport.aborted
    joining, joining_out, _ = make()
    joining.close("test")
    assert joining_out.writes == [HEAD + END_CHUNK]


def test_abort_writes_nothing() -> None:
    stream, transport, owner = make()
    stream.close("slow_consumer", abort=True, final=FINAL)
    assert transport.writes == []
    assert transport.aborted and not transport.closed
    assert owner.closed == [(stream, "slow_consumer")]


def test_abort_of_a_live_stream_writes_no_last_chunk() -> None:
    # A reset, not a graceful end: the client must not take a cut stream for a complete one.
    stream, transport, _ = live()
    deliver(stream, "1-1")
    stream.close("slow_consumer", abort=True, final=FINAL)
    assert transport.writes == [frame("1-1")]
    assert split_chunks(transport.output) == ([plain("1-1")], False)
    assert transport.aborted and not transport.closed


# --- deliver in each state ------------------------------------------------------------------


def test_deliver_while_joining_is_ignored() -> None:
    stream, transport, _ = make()
    assert deliver(stream, "1-1") == 0
    assert stream.go_live(CONNECTED, [], None) == 0
    assert transport.writes == [HEAD + http_chunk(CONNECTED)]  # the event was not for it yet


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
        HEAD + http_chunk(CONNECTED) + frame("1-2") + frame(None, "plain") + frame("1-3")
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
    assert transport.writes == [END_CHUNK]
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
    chunks, ended = split_chunks(data[len(HEAD) :])
    assert not ended
    assert len(chunks) == 7  # `connected`, then each event its own chunk, as it came
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
    assert re.findall(rb"^id: (.*)$", body_of(data), re.MULTILINE) == [
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
    assert transport.writes == [HEAD + http_chunk(CONNECTED) + frame("1-3")]


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
    stream.close("again", final=FINAL)
    stream.resume_writing()
    assert transport.writes == writes
    assert owner.calls == [f"stream_closed:{reason}", "socket_closed"]


def test_connection_lost_after_close_reports_the_socket_only() -> None:
    stream, transport, owner = live()
    stream.close("shutdown", final=FINAL)
    stream.connection_lost(None)
    assert owner.calls == ["stream_closed:shutdown", "socket_closed"]
    assert transport.writes == [http_chunk(FINAL) + END_CHUNK]


def test_data_from_the_client_is_ignored() -> None:
    stream, transport, owner = live()
    stream.data_received(b"GET / HTTP/1.1\r\n\r\n")
    assert transport.writes == []
    assert stream.state is S.LIVE
    assert owner.calls == []


# --- farewell and spread_retry --------------------------------------------------------------


def test_spread_retry_is_within_the_spread() -> None:
    values = {spread_retry(2000) for _ in range(300)}
    assert all(2000 <= v < 2000 + RETRY_SPREAD_MS for v in values)
    assert len(values) > 1  # spread, not one value for every client


@pytest.mark.parametrize("pick", [lambda n: 0, lambda n: n - 1])
def test_spread_retry_edges(monkeypatch: pytest.MonkeyPatch, pick: Callable[[int], int]) -> None:
    monkeypatch.setattr(random, "randrange", pick)  # the module `stream` draws from
    expected = 1500 + pick(RETRY_SPREAD_MS)
    assert spread_retry(1500) == expected
    assert farewell("shutdown", 1500) == encode_close(
        "shutdown", CLOSE_MESSAGES["shutdown"], expected
    )
    assert 1500 <= expected < 1500 + RETRY_SPREAD_MS
    assert random.randrange is pick


def test_farewell_exact_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "randrange", lambda n: 250)
    assert farewell("shutdown", 3000) == (
        b"event: close\nretry: 3250\n"
        b'data: {"reason":"shutdown","message":"the gateway is shutting down"}\n\n'
    )


@pytest.mark.parametrize("reason", ["shutdown", "history_gap", "replay_failed", "error"])
def test_farewell_is_one_close_event_with_its_reason_and_a_spread_retry(reason: str) -> None:
    retries = set()
    for _ in range(50):
        parsed = parse_sse(farewell(reason, 2000))
        [event] = parsed.events
        assert event.type == "close" and event.id == ""
        assert json.loads(event.data) == {"reason": reason, "message": CLOSE_MESSAGES[reason]}
        assert parsed.retry is not None and 2000 <= parsed.retry < 2000 + RETRY_SPREAD_MS
        retries.add(parsed.retry)
    assert len(retries) > 1
    assert CLOSE_MESSAGES[reason].strip()


def test_farewell_message_override_and_unknown_reason() -> None:
    [event] = parse_sse(farewell("shutdown", 10, "going away")).events
    assert json.loads(event.data) == {"reason": "shutdown", "message": "going away"}
    [event] = parse_sse(farewell("odd_reason", 10)).events
    assert json.loads(event.data) == {"reason": "odd_reason", "message": "odd_reason"}


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


# --- chunked (HTTP/1.1) and plain (HTTP/1.0) bodies -------------------------------------------


def test_every_write_of_a_stream_is_whole_chunks_and_the_body_ends_with_the_last() -> None:
    stream, transport, _ = make()
    stream.begin_replay()
    deliver(stream, "1-3")
    stream.go_live(CONNECTED, [HistoryEvent("1-2", frame("1-2"))], parse_stream_id("1-1"))
    deliver(stream, "1-4")
    stream.heartbeat(HEARTBEAT)
    stream.pause_writing()
    deliver(stream, "1-5")
    stream.resume_writing()
    final = farewell("shutdown", 1000)
    stream.close("shutdown", final=final)
    assert transport.writes[0].startswith(HEAD)
    writes = [transport.writes[0][len(HEAD) :], *transport.writes[1:]]
    for data in writes[:-1]:
        assert split_chunks(data)[1] is False  # whole chunks, no end yet
    chunks, ended = split_chunks(b"".join(writes))
    assert ended
    assert chunks == [
        CONNECTED,
        plain("1-2"),
        plain("1-3"),
        plain("1-4"),
        encode_comment("hb"),
        plain("1-5"),
        final,
    ]


def make_plain(
    owner: FakeOwner | None = None, paused: bool = False
) -> tuple[PlainStream, FakeTransport, FakeOwner]:
    transport = FakeTransport()
    owner = owner if owner is not None else FakeOwner()
    stream = PlainStream(transport, b"ch", 7, PLAIN_HEAD, owner, paused)  # type: ignore[arg-type]
    return stream, transport, owner


def test_stream_kinds() -> None:
    assert Stream.CHUNKED is True
    assert PlainStream.CHUNKED is False
    assert b"Transfer-Encoding: chunked\r\n" in HEAD
    assert b"Transfer-Encoding" not in PLAIN_HEAD


def test_plain_stream_writes_connected_and_live_events_unchunked() -> None:
    stream, transport, _ = make_plain()
    assert stream.go_live(CONNECTED, [], None) == 0
    assert deliver(stream, "1-1") == 1
    assert deliver(stream, None, "no id") == 1
    assert transport.writes == [PLAIN_HEAD + CONNECTED, plain("1-1"), plain(None, "no id")]


def test_plain_stream_merges_held_and_replayed_events_unchunked() -> None:
    stream, transport, _ = make_plain()
    stream.begin_replay()
    for event_id in ("1-2", None, "1-3", "1-2"):
        assert deliver(stream, event_id, f"live {event_id}") == 0
    assert transport.writes == []
    replayed = [HistoryEvent(i, frame(i, f"history {i}")) for i in ("1-1", "1-2")]
    assert stream.go_live(CONNECTED, replayed, parse_stream_id("1-0")) == 4
    assert transport.writes == [
        PLAIN_HEAD
        + CONNECTED
        + plain("1-1", "history 1-1")
        + plain("1-2", "history 1-2")
        + plain(None, "live None")
        + plain("1-3", "live 1-3")
    ]
    assert stream.floor == (1, 3)
    assert deliver(stream, "1-3") == 0  # a late copy, below the floor
    assert deliver(stream, "1-4") == 1
    assert transport.writes[-1] == plain("1-4")


def test_plain_stream_heartbeats_and_queue_are_unchunked() -> None:
    stream, transport, _ = make_plain()
    stream.go_live(CONNECTED, [], None)
    transport.writes.clear()
    stream.heartbeat(HEARTBEAT)
    stream.pause_writing()
    deliver(stream, "1-1")
    deliver(stream, "1-2")
    stream.heartbeat(HEARTBEAT)  # skipped while paused
    assert transport.writes == [encode_comment("hb")]
    stream.resume_writing()
    assert transport.writes == [encode_comment("hb"), plain("1-1"), plain("1-2")]


def test_plain_stream_close_writes_the_final_frame_and_no_last_chunk() -> None:
    stream, transport, owner = make_plain()
    stream.go_live(CONNECTED, [], None)
    final = farewell("shutdown", 1000)
    stream.close("shutdown", final=final)
    assert transport.output == PLAIN_HEAD + CONNECTED + final
    assert transport.closed and not transport.aborted
    assert owner.closed == [(stream, "shutdown")]
    # Without a final frame, nothing more than the head and `connected`: the close ends it.
    bare, bare_out, _ = make_plain()
    bare.go_live(CONNECTED, [], None)
    bare.close("test")
    assert bare_out.output == PLAIN_HEAD + CONNECTED
    assert bare_out.closed


@pytest.mark.parametrize("replaying", [False, True])
def test_plain_stream_closed_before_go_live_writes_head_and_final(replaying: bool) -> None:
    stream, transport, _ = make_plain()
    if replaying:
        stream.begin_replay()
        deliver(stream, "1-1")  # held, then dropped with the stream
    final = farewell("replay_failed", 1000)
    stream.close("replay_failed", final=final)
    assert transport.output == PLAIN_HEAD + final
    assert transport.closed


def test_plain_stream_abort_writes_nothing() -> None:
    stream, transport, owner = make_plain(FakeOwner(event_buffer_size=1), paused=True)
    stream.go_live(CONNECTED, [], None)
    transport.writes.clear()
    deliver(stream, "1-1")
    deliver(stream, "1-2")  # one more than the queue holds
    assert owner.closed == [(stream, "slow_consumer")]
    assert transport.aborted and transport.writes == []
