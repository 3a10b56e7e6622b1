"""HeartbeatScheduler on a real asyncio loop, with fake streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from fakes import split_chunks
from sse_spec_parser import parse_sse

from sse_gateway.streams.heartbeat import HeartbeatScheduler, heartbeat_frame

PERIOD = 0.2
WAIT = 10.0  # generous upper bound for anything that should take a few periods


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.hb_slot = -1
        self.frames: list[bytes] = []
        self.changed = asyncio.Event()

    def heartbeat(self, frame: bytes) -> bool:
        self.frames.append(frame)
        self.changed.set()
        return True

    async def wait_for(self, count: int) -> None:
        async def loop() -> None:
            while len(self.frames) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), WAIT)

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_heartbeat_frame_is_one_chunk_of_a_heartbeat_event() -> None:
    # Streams take every frame as an HTTP/1.1 chunk (a PlainStream unchunks it).
    frame = heartbeat_frame(1764302400000)
    event = b'event: heartbeat\ndata: {"ts":1764302400000}\n\n'
    assert frame == b"2d\r\n" + event + b"\r\n"  # 45 bytes
    chunks, ended = split_chunks(frame)
    assert chunks == [event] and not ended
    events = parse_sse(chunks[0]).events
    assert len(events) == 1
    assert events[0].type == "heartbeat"
    assert json.loads(events[0].data) == {"ts": 1764302400000}


@pytest.mark.parametrize(
    ("period", "slots"), [(0.05, 10), (0.2, 10), (1.0, 10), (15.0, 150), (2.0, 20)]
)
def test_ring_geometry(period: float, slots: int) -> None:
    scheduler = HeartbeatScheduler(period)
    assert scheduler.slot_count == slots
    assert scheduler.tick * scheduler.slot_count == pytest.approx(period)


def test_every_stream_receives_heartbeats_with_the_clock_time() -> None:
    async def body() -> None:
        scheduler = HeartbeatScheduler(PERIOD, clock=lambda: 1764302400.123)
        streams = [FakeStream(str(i)) for i in range(5)]
        for stream in streams:
            scheduler.add(stream)
        scheduler.start()
        try:
            for stream in streams:
                await stream.wait_for(3)
        finally:
            scheduler.stop()
        for stream in streams:
            for frame in stream.frames:
                [body], _ = split_chunks(frame)
                events = parse_sse(body).events
                assert [e.type for e in events] == ["heartbeat"]
                assert json.loads(events[0].data) == {"ts": 1764302400123}

    run(body)


def test_streams_added_at_different_times_are_spread_over_slots() -> None:
    async def body() -> None:
        scheduler = HeartbeatScheduler(PERIOD)
        scheduler.start()
        streams: list[FakeStream] = []
        try:
            # Between two additions at least one tick fires, so the ring has moved on; how far
            # depends on the loop's load, so only "not all in one slot" is certain.
            for i in range(4):
                stream = FakeStream(str(i))
                scheduler.add(stream)
                streams.append(stream)
                await asyncio.sleep(scheduler.tick * 1.5)
            slots = [stream.hb_slot for stream in streams]
            assert all(0 <= slot < scheduler.slot_count for slot in slots)
            assert len(set(slots)) >= 2, slots
            for stream in streams:
                await stream.wait_for(2)
        finally:
            scheduler.stop()

    run(body)


def test_streams_added_together_are_spread_over_the_ring() -> None:
    """A reconnect storm must not put every stream in the same tick's slot."""
    scheduler = HeartbeatScheduler(PERIOD)
    streams = [FakeStream(f"s{i}") for i in range(200)]
    for stream in streams:
        scheduler.add(stream)
    slots = {stream.hb_slot for stream in streams}
    assert len(slots) > scheduler.slot_count // 2
    assert all(0 <= slot < scheduler.slot_count for slot in slots)


def test_a_new_stream_beats_within_one_period() -> None:
    async def body() -> None:
        scheduler = HeartbeatScheduler(PERIOD)
        scheduler.start()
        try:
            late = FakeStream("late")
            scheduler.add(late)
            await late.wait_for(2)  # wait_for's own timeout bounds it generously
        finally:
            scheduler.stop()

    run(body)


def test_removed_stream_stops_receiving() -> None:
    async def body() -> None:
        scheduler = HeartbeatScheduler(PERIOD)
        removed, kept = FakeStream("removed"), FakeStream("kept")
        scheduler.add(removed)
        scheduler.add(kept)  # same slot: whenever `kept` beats, `removed` would have too
        scheduler.start()
        try:
            await removed.wait_for(1)
            scheduler.remove(removed)
            count = len(removed.frames)
            await kept.wait_for(len(kept.frames) + 3)
            assert len(removed.frames) == count
        finally:
            scheduler.stop()

    run(body)


def test_stream_removing_itself_during_its_heartbeat() -> None:
    async def body() -> None:
        scheduler = HeartbeatScheduler(PERIOD)
        streams = [FakeStream(str(i)) for i in range(3)]
        quitter = streams[1]

        def quit_on_first(frame: bytes) -> bool:
            FakeStream.heartbeat(quitter, frame)
            scheduler.remove(quitter)
            return True

        quitter.heartbeat = quit_on_first  # type: ignore[method-assign]
        for stream in streams:
            scheduler.add(stream)
        scheduler.start()
        try:
            await streams[0].wait_for(3)
            await streams[2].wait_for(3)
        finally:
            scheduler.stop()
        assert len(quitter.frames) == 1

    run(body)


def test_stop_ends_heartbeats() -> None:
    async def body() -> None:
        scheduler = HeartbeatScheduler(PERIOD)
        stopped, other = FakeStream("stopped"), FakeStream("other")
        scheduler.add(stopped)
        scheduler.start()
        await stopped.wait_for(1)
        scheduler.stop()
        count = len(stopped.frames)
        # a second scheduler on the same loop proves time went by for several periods
        witness = HeartbeatScheduler(PERIOD)
        witness.add(other)
        witness.start()
        try:
            await other.wait_for(3)
        finally:
            witness.stop()
        assert len(stopped.frames) == count

    run(body)


def test_many_streams_each_get_a_heartbeat_every_turn() -> None:
    async def body() -> None:
        scheduler = HeartbeatScheduler(PERIOD)
        scheduler.start()
        streams = [FakeStream(str(i)) for i in range(200)]
        try:
            for i, stream in enumerate(streams):
                scheduler.add(stream)
                if i % 20 == 19:
                    await asyncio.sleep(scheduler.tick)
            for stream in streams:
                await stream.wait_for(2)
        finally:
            scheduler.stop()
        assert len({stream.hb_slot for stream in streams}) > 1

    run(body)
