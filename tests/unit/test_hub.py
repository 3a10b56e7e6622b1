"""ConnectionHub over a real MemoryBroker, with simple fake streams."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sse_spec_parser import Event, parse_sse

from sse_gateway.broker.memory import MemoryBroker
from sse_gateway.publish import PreparedEvent
from sse_gateway.streams.hub import ConnectionHub
from sse_gateway.streams.stream import Stream
from sse_gateway.wire.envelope import parse_envelope
from sse_gateway.wire.frames import chunk, encode_event, unchunk
from sse_gateway.wire.ids import parse_stream_id
from sse_gateway.wire.naming import channel_name

CH = channel_name("b1", "p1")
OTHER = channel_name("b1", "p2")


class RecordingTransport:
    """What a Stream calls on its transport; writes are recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.stream: FakeStream | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        stream = self.stream
        if stream is not None and stream.on_send is not None and data:
            stream.on_send(stream)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class Owner:
    event_buffer_size = 50

    def stream_closed(self, stream: Stream, reason: str) -> None:
        pass

    def socket_closed(self, stream: Stream) -> None:
        pass


CONNECTED = encode_event("connected", "{}")


class FakeStream(Stream):
    """A real Stream (LIVE, or JOINING with `active=False`) on a recording transport.

    `frames` are the writes after `go_live`'s (the head and `connected`): what the hub sent.
    """

    def __init__(self, channel: bytes, *, active: bool = True, copy: bool = True) -> None:
        transport = RecordingTransport()
        # A fresh bytes object each time, as a request builds its own channel name.
        name = bytes(bytearray(channel)) if copy else channel
        super().__init__(transport, name, 0, b"", Owner())  # type: ignore[arg-type]
        self.recorded = transport
        self.on_send: Callable[[FakeStream], None] | None = None
        transport.stream = self
        if active:
            self.go_live(CONNECTED, [], None)

    def go_live(self, connected: bytes, replayed: list[Any], last: tuple[int, int] | None) -> int:
        written = super().go_live(connected, replayed, last)
        self.recorded.writes.clear()  # the head and `connected`: not the hub's
        return written

    @property
    def frames(self) -> list[bytes]:
        return [data for data in self.recorded.writes if data]


class RecordingBroker(MemoryBroker):
    """The real embedded broker, remembering what the hub asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []
        self.hub: ConnectionHub | None = None

    async def start(self, on_message: object = None, on_state: object = None) -> None:
        await super().start(self._deliver, lambda _up: None)

    def _deliver(self, channel: bytes, payload: bytes) -> None:
        assert self.hub is not None
        envelope = parse_envelope(payload, 65_536)
        self.hub.deliver(channel, chunk(envelope.encode()), envelope.id)  # as `Fanout` does

    def subscribe(self, channel: bytes) -> None:
        self.calls.append(("subscribe", channel))
        super().subscribe(channel)

    def unsubscribe(self, channel: bytes) -> None:
        self.calls.append(("unsubscribe", channel))
        super().unsubscribe(channel)


def make_hub() -> tuple[ConnectionHub, RecordingBroker]:
    broker = RecordingBroker()
    hub = ConnectionHub(broker)
    broker.hub = hub
    return hub, broker


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


async def receivers(broker: MemoryBroker, channel: bytes) -> int:
    """How many processes a publish reaches: 1 when the broker holds the subscription."""
    [published] = await broker.publish_events([PreparedEvent(channel, "probe", "0")])
    await asyncio.sleep(0)  # let the broker hand the message over, as a socket read would
    return published.receivers


def noop() -> None:
    pass


# --- reference counting ------------------------------------------------------------------------


def test_subscribe_on_first_join_only_and_unsubscribe_after_last_leave() -> None:
    hub, broker = make_hub()
    a, b, c = FakeStream(CH), FakeStream(CH), FakeStream(CH)
    hub.join(a, noop)
    assert broker.calls == [("subscribe", CH)]
    hub.join(b, noop)
    hub.join(c, noop)
    assert broker.calls == [("subscribe", CH)]
    hub.leave(b)
    hub.leave(a)
    assert broker.calls == [("subscribe", CH)]
    assert hub.channel_count == 1
    hub.leave(c)
    assert broker.calls == [("subscribe", CH), ("unsubscribe", CH)]
    assert hub.channel_count == 0
    assert hub.get(CH) is None


def test_subscription_is_live_at_the_broker_while_streams_remain() -> None:
    async def body() -> None:
        hub, broker = make_hub()
        await broker.start()
        a, b = FakeStream(CH), FakeStream(CH)
        assert await receivers(broker, CH) == 0
        hub.join(a, noop)
        hub.join(b, noop)
        assert await receivers(broker, CH) == 1
        hub.leave(a)
        assert await receivers(broker, CH) == 1
        hub.leave(b)
        assert await receivers(broker, CH) == 0
        await broker.close()

    run(body)


def test_leaving_twice_or_without_joining_is_harmless() -> None:
    hub, broker = make_hub()
    a, b, stranger = FakeStream(CH), FakeStream(CH), FakeStream(CH)
    hub.join(a, noop)
    hub.join(b, noop)
    hub.leave(a)
    hub.leave(a)
    hub.leave(stranger)
    hub.leave(FakeStream(OTHER))
    assert broker.calls == [("subscribe", CH)]
    assert hub.streams() == [b]
    hub.leave(b)
    hub.leave(b)
    assert broker.calls == [("subscribe", CH), ("unsubscribe", CH)]


def test_rejoin_after_last_leave_subscribes_again_with_a_new_channel() -> None:
    hub, broker = make_hub()
    a = FakeStream(CH)
    first = hub.join(a, noop)
    hub.leave(a)
    b = FakeStream(CH)
    second = hub.join(b, noop)
    assert second is not first
    assert broker.calls == [("subscribe", CH), ("unsubscribe", CH), ("subscribe", CH)]
    assert hub.get(CH) is second


def test_channels_are_independent() -> None:
    hub, broker = make_hub()
    a, b = FakeStream(CH), FakeStream(OTHER)
    hub.join(a, noop)
    hub.join(b, noop)
    assert hub.channel_count == 2
    hub.leave(a)
    assert broker.calls == [("subscribe", CH), ("subscribe", OTHER), ("unsubscribe", CH)]
    assert hub.get(OTHER) is not None


def test_streams_of_a_player_share_one_channel_name_object() -> None:
    hub, _ = make_hub()
    a = FakeStream(CH)
    fresh = bytes(bytearray(CH))  # as the next request of that player builds it
    assert a.channel is not fresh
    channel = hub.join(a, noop)
    b = FakeStream(hub.intern(fresh), copy=False)
    assert hub.join(b, noop) is channel
    assert b.channel is a.channel is channel.name
    assert channel.streams == [a, b]


def test_on_ready_runs_for_every_join() -> None:
    hub, _ = make_hub()
    ready: list[str] = []
    hub.join(FakeStream(CH), lambda: ready.append("a"))
    hub.join(FakeStream(CH), lambda: ready.append("b"))
    assert ready == ["a", "b"]


def test_streams_lists_every_joined_stream() -> None:
    hub, _ = make_hub()
    streams = [FakeStream(CH), FakeStream(CH), FakeStream(OTHER)]
    for stream in streams:
        hub.join(stream, noop)
    assert sorted(map(id, hub.streams())) == sorted(map(id, streams))


# --- delivery ----------------------------------------------------------------------------------

FRAME = chunk(b"event: t\ndata: 1\n\n")  # frames reach the hub as chunks


def test_deliver_returns_the_number_of_active_streams_written() -> None:
    hub, _ = make_hub()
    active = [FakeStream(CH), FakeStream(CH)]
    inactive = FakeStream(CH, active=False)
    other = FakeStream(OTHER)
    for stream in [*active, inactive, other]:
        hub.join(stream, noop)
    assert hub.deliver(CH, FRAME, None) == 2
    assert [s.frames for s in active] == [[FRAME], [FRAME]]
    assert inactive.frames == []
    assert other.frames == []


def test_deliver_to_unknown_channel_is_zero() -> None:
    hub, _ = make_hub()
    hub.join(FakeStream(CH), noop)
    assert hub.deliver(OTHER, FRAME, None) == 0


def test_deliver_after_everyone_left_is_zero() -> None:
    hub, _ = make_hub()
    stream = FakeStream(CH)
    hub.join(stream, noop)
    hub.leave(stream)
    assert hub.deliver(CH, FRAME, None) == 0
    assert stream.frames == []


def test_inactive_stream_starts_receiving_once_active() -> None:
    hub, _ = make_hub()
    stream = FakeStream(CH, active=False)
    hub.join(stream, noop)
    assert hub.deliver(CH, b"first", None) == 0
    stream.go_live(CONNECTED, [], None)
    assert hub.deliver(CH, b"second", None) == 1
    assert stream.frames == [b"second"]


def test_inactive_stream_that_holds_collects_events_with_their_ids() -> None:
    hub, _ = make_hub()
    replaying = FakeStream(CH, active=False)
    replaying.begin_replay()
    live = FakeStream(CH)
    hub.join(replaying, noop)
    hub.join(live, noop)
    assert hub.deliver(CH, b"f1", "1-0") == 1
    assert hub.deliver(CH, b"f2", None) == 1
    assert replaying.frames == []
    assert replaying.held == [("1-0", b"f1"), (None, b"f2")]
    assert live.frames == [b"f1", b"f2"]


def test_a_held_channel_delivers_nothing_and_keeps_the_events() -> None:
    hub, _ = make_hub()
    stream = FakeStream(CH)
    channel = hub.join(stream, noop)
    channel.hold()
    assert hub.deliver(CH, b"f1", "5-0") == 0
    assert stream.frames == []
    assert channel.held == [("5-0", b"f1")]

    assert channel.last is None


@pytest.mark.parametrize(
    ("ids", "last"),
    [
        (["1-0", "2-0"], (2, 0)),
        (["1-0", "custom-id"], (1, 0)),
        (["7-3", None], (7, 3)),
        (["x"], None),
    ],
)
def test_last_id_tracks_history_ids_only(
    ids: list[str | None], last: tuple[int, int] | None
) -> None:
    hub, _ = make_hub()
    channel = hub.join(FakeStream(CH), noop)
    for event_id in ids:
        hub.deliver(CH, FRAME, event_id)
    assert channel.last == last


def test_a_stream_closing_during_delivery_does_not_disturb_the_others() -> None:
    hub, broker = make_hub()
    streams = [FakeStream(CH) for _ in range(4)]
    for stream in streams:
        hub.join(stream, noop)
    streams[1].on_send = hub.leave  # a slow consumer closed on write
    assert hub.deliver(CH, FRAME, None) == 4
    assert all(s.frames == [FRAME] for s in streams)
    assert hub.deliver(CH, FRAME, None) == 3
    assert len(streams[1].frames) == 1
    assert broker.calls == [("subscribe", CH)]


def test_last_stream_closing_during_delivery_unsubscribes() -> None:
    hub, broker = make_hub()
    stream = FakeStream(CH)
    hub.join(stream, noop)
    stream.on_send = hub.leave
    assert hub.deliver(CH, FRAME, None) == 1
    assert broker.calls == [("subscribe", CH), ("unsubscribe", CH)]


def test_published_events_reach_active_streams_through_the_memory_broker() -> None:
    async def body() -> None:
        hub, broker = make_hub()
        await broker.start()
        a, b, waiting = FakeStream(CH), FakeStream(CH), FakeStream(CH, active=False)
        for stream in (a, b, waiting):
            hub.join(stream, noop)
        [published] = await broker.publish_events([PreparedEvent(CH, "note", '{"x":1}')])
        assert published.receivers == 1
        for _ in range(100):
            if a.frames:
                break
            await asyncio.sleep(0)
        expected = Event(type="note", data='{"x":1}', id=str(published))
        assert [parse_sse(unchunk(f)).events for f in a.frames] == [[expected]]
        assert [parse_sse(unchunk(f)).events for f in b.frames] == [[expected]]
        assert waiting.frames == []
        assert hub.get(CH) is not None
        assert hub.get(CH).last == parse_stream_id(published)  # type: ignore[union-attr]
        await broker.close()

    run(body)


def test_late_copies_below_the_channel_and_stream_floors_are_skipped() -> None:
    hub = ConnectionHub(RecordingBroker())
    replayed, plain = FakeStream(CH, active=False), FakeStream(CH)
    for stream in (replayed, plain):
        hub.join(stream, lambda: None)
    replayed.begin_replay()
    replayed.go_live(CONNECTED, [], (7, 0))  # this stream was sent up to 7-0 from history
    assert replayed.floor == (7, 0)
    assert hub.deliver(CH, b"f5", "5-0") == 1  # only the stream without a floor
    assert hub.deliver(CH, b"f5", "5-0") == 0  # at or below the channel's last id: a copy
    assert hub.deliver(CH, b"f8", "8-0") == 2  # newer than both: everyone, floor cleared
    assert replayed.floor is None
    assert replayed.frames == [b"f8"] and plain.frames == [b"f5", b"f8"]
